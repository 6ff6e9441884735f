"""Any writer syntax into any receiver, end to end: a user learner logs known metrics with explicit steps,
each site in another syntax (MLflow, TensorBoard, W&B), while MLflow, TensorBoard, W&B and a custom receiver
(named by import path) all take the job's records. Each back end is read back for real: MlflowClient,
TensorBoard's EventAccumulator / EventMultiplexer on ``<job>/tb_events``, and W&B's offline run files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from fl_ray import JobConfig, load_config, run_job
from fl_ray.learners import load_learner
from fl_ray.receivers.base import build_receiver
from fl_ray.receivers.wandb import RESERVED_KEYS

from conftest import NO_DATA, REPO, new_workspace

from user_learners import SYNTAX_PARAMS, SYNTAXES, expected_series
from wandb_reader import read_runs

ROUNDS = 2
SITE_SYNTAX = dict(zip(("site-1", "site-2", "site-3"), SYNTAXES))  # each site logs in another syntax
SITES = tuple(SITE_SYNTAX)
RUNS = (*SITES, "server")  # the server logs the global metrics into a run of its own
CUSTOM = "user_receivers_SeriesReceiver"  # the report name of receiver type user_receivers:SeriesReceiver

Series = dict[str, list[tuple[int, object]]]  # key -> sorted [(step, value as float32)]


def syntax_config(receivers: list[dict] | None = None, **tracking) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "matrix",
            "num_rounds": ROUNDS,
            "sites": len(SITES),
            "min_clients": len(SITES),
            "learner": "user_learners:SyntaxLearner",
            "learner_args": {"syntax": SITE_SYNTAX},
            "dataset": NO_DATA,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "tracking": {
                "receivers": receivers
                or [
                    {"type": "mlflow"},
                    {"type": "tensorboard"},
                    {"type": "wandb"},
                    {"type": "user_receivers:SeriesReceiver"},
                ],
                **tracking,
            },
        }
    )


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, mlflow_store):
    """The job, into all four receivers at once."""
    return run_job(
        syntax_config(), show_progress=False, workspace=new_workspace(tmp_path_factory.mktemp("ws"), mlflow_store)
    )


def _f32(value: float) -> object:
    """A value as TensorBoard keeps it (float32); NaN as a string so that equal series compare equal."""
    value = float(np.float32(value))
    return "nan" if math.isnan(value) else value


def mlflow_series(result) -> dict[str, Series]:
    info = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    out = {}
    for run_name, run_id in info["run_ids"].items():
        keys = client.get_run(run_id).data.metrics
        out[run_name] = {k: sorted((m.step, _f32(m.value)) for m in client.get_metric_history(run_id, k)) for k in keys}
    return out


def tensorboard_series(job_dir: Path) -> dict[str, Series]:
    """Scalars of every site's run and sub-runs; an add_scalars sub-run ``<group>_<k>`` with tag ``group``
    reads back as key ``group/k``."""
    out = {}
    for site_dir in sorted(p for p in (job_dir / "tb_events").iterdir() if p.is_dir()):
        series: Series = {}
        for run_dir in (site_dir, *sorted(p for p in site_dir.iterdir() if p.is_dir())):
            acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                key = tag if run_dir == site_dir else f"{tag}/{run_dir.name[len(tag.replace('/', '_')) + 1 :]}"
                series[key] = sorted((s.step, _f32(s.value)) for s in acc.Scalars(tag))
        out[site_dir.name] = series
    return out


def wandb_series(job_dir: Path) -> dict[str, Series]:
    out = {}
    for name, run in read_runs(job_dir / "wandb").items():
        series: dict[str, list] = {}
        for row in run.history:
            for key, value in row.items():
                if key != "fl_step" and not key.startswith("_") and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((row["fl_step"], _f32(value)))
        out[name] = {k: sorted(v) for k, v in series.items()}
    return out


def custom_series(result) -> dict[str, Series]:
    metrics = result.tracking["receivers"][CUSTOM]["metrics"]
    return {
        site: {k: sorted((s, _f32(v)) for s, v in points) for k, points in keys.items()}
        for site, keys in metrics.items()
    }


def without_reserved(series: dict[str, Series]) -> dict[str, Series]:
    return {run: {k: v for k, v in keys.items() if k not in RESERVED_KEYS} for run, keys in series.items()}


def learner_keys(series: dict[str, Series]) -> dict[str, Series]:
    """The sites' series of what SyntaxLearner logged (system metrics and the server's run left out)."""
    keys = expected_series(SITES[0], ROUNDS)
    return {site: {k: v for k, v in series[site].items() if k in keys} for site in SITES}


def test_every_back_end_holds_the_same_series_whichever_syntax_logged_it(job):
    """MLflow, TensorBoard and W&B hold, for every run and key, the same (step, value) series, and each site's
    keys hold exactly what it logged in its syntax; W&B alone leaves out ``fl_step``, its own column."""
    assert job.status == "FINISHED"
    mlflow, tensorboard, wandb = mlflow_series(job), tensorboard_series(job.job_dir), wandb_series(job.job_dir)
    assert sorted(mlflow) == sorted(tensorboard) == sorted(wandb) == sorted(RUNS)
    assert tensorboard == mlflow
    assert wandb == without_reserved(mlflow)
    expected = {
        site: {k: [(s, _f32(v)) for s, v in pts] for k, pts in expected_series(site, ROUNDS).items()} for site in SITES
    }
    assert learner_keys(mlflow) == expected
    assert mlflow["server"]["global_loss"] == [(r, 2.0**-r) for r in range(1, ROUNDS + 1)]


def site_params(site: str) -> dict[str, str]:
    """The params a site logged: none in TensorBoard syntax, which has no params call."""
    return {} if SITE_SYNTAX[site] == "tensorboard" else SYNTAX_PARAMS


def test_wandb_run_per_site_with_name_group_and_config(job):
    """Each site (and the server) has its offline W&B run: name = site, group = job id, project = job name,
    finished; params in its config; the dropped fl_step records are counted in result.json."""
    runs = read_runs(job.job_dir / "wandb")
    assert sorted(runs) == sorted(RUNS)
    for name, run in runs.items():
        assert (run.name, run.group, run.project, run.exit_code) == (name, job.job_id, "matrix", 0)
        assert run.config == (site_params(name) if name in SITES else {})
    report = json.loads((job.job_dir / "result.json").read_text())["tracking"]["receivers"]["wandb"]
    assert report["mode"] == "offline" and report["errors"] == {} and report["not_written"] == {}
    assert report["dropped"] == {site: {"fl_step": ROUNDS} for site in SITES}
    assert report["undelivered"] == 0 and "error" not in report


def test_tensorboard_shows_every_site_side_by_side(job):
    """``tensorboard --logdir <job>/tb_events`` finds a run per site and the server; add_scalars series sit
    in torch's sub-runs ``<site>/pair_a``, ``<site>/pair_b``; other syntaxes keep ``pair/a`` in the site's run."""
    mux = EventMultiplexer().AddRunsFromDirectory(str(job.job_dir / "tb_events"))
    mux.Reload()
    sub_runs = [f"{site}/pair_{k}" for site, syntax in SITE_SYNTAX.items() if syntax == "tensorboard" for k in "ab"]
    assert sorted(mux.Runs()) == sorted([*RUNS, *sub_runs])
    for site, syntax in SITE_SYNTAX.items():
        scalars = mux.GetAccumulator(site).Tags()["scalars"]
        assert {"loss", "acc", "fl_step"} <= set(scalars)
        assert ("pair/a" in scalars) == (syntax != "tensorboard")
    assert job.tracking["receivers"]["tensorboard"]["sites"] == sorted(RUNS)


def test_custom_receiver_by_import_path_gets_the_same_events(job):
    """A receiver named ``user_receivers:SeriesReceiver`` gets exactly the records MLflow got (metrics and params)."""
    report = job.tracking["receivers"][CUSTOM]
    assert report["status"] == "FINISHED" and report["undelivered"] == 0
    assert custom_series(job) == mlflow_series(job)
    client = MlflowClient(job.tracking["receivers"]["mlflow"]["tracking_uri"])
    for site in SITES:
        run = client.get_run(job.tracking["receivers"]["mlflow"]["run_ids"][site])
        assert report["params"].get(site, {}) == run.data.params == site_params(site)


def test_wandb_site_process_errors_reach_result_json(ray_session, tmp_path):
    """W&B site processes that cannot start their run (online, no API key) do not stop the job; the
    error, per site and with what was not written, lands in result.json next to the other receivers'."""
    cfg = syntax_config(
        # the job waits this long on W&B (delivery is retried until then): room for the site processes to
        # start and fail on a busy machine
        [{"type": "wandb", "mode": "online", "close_timeout": 15}, {"type": "user_receivers:SeriesReceiver"}],
        close_timeout=15,
    )
    result = run_job(cfg, workspace=tmp_path, show_progress=False)
    assert result.status == "FINISHED"
    report = json.loads((result.job_dir / "result.json").read_text())["tracking"]["receivers"]
    wandb = report["wandb"]
    assert "W&B site process failed" in wandb["error"] and "API key" in wandb["error"]
    assert wandb["undelivered"] > 0
    # the first failure stops delivery to W&B, so sites whose records come later never start a process
    assert wandb["errors"] and set(wandb["errors"]) <= set(RUNS)
    for run, why in wandb["errors"].items():
        assert "API key" in why and wandb["not_written"][run] > 0 and wandb["written"][run] == 0
    assert report[CUSTOM]["undelivered"] == 0 and "error" not in report[CUSTOM]


@pytest.mark.parametrize(
    "name, receivers",
    [
        ("fedavg_digits_tb", ["tensorboard"]),
        ("fedavg_digits_wandb", ["wandb"]),
        ("fedavg_digits_all", ["mlflow", "tensorboard", "wandb"]),
        ("fedavg_digits_tb_syntax_to_mlflow", ["mlflow"]),
    ],
)
def test_example_configs_are_valid(name, receivers):
    """The example configs load, and their learner and receivers build."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    learner = load_learner(cfg.learner, cfg.learner_args)
    assert learner.log_syntax == ("tensorboard" if "syntax" in name else "mlflow")
    assert [r.type for r in cfg.tracking.receivers] == receivers
    for r in cfg.tracking.receivers:
        build_receiver(r.type, r.params)


@pytest.mark.parametrize("syntax", ["tensorboard", "wandb"])
def test_builtin_learner_logs_in_the_chosen_syntax(ray_session, workspace, tmp_path, syntax):
    """configs/fedavg_digits_tb_syntax_to_mlflow.yaml (and its W&B-syntax twin): the built-in learner's
    train_loss and val_accuracy reach MLflow with steps that continue across rounds, and its
    hyper-parameters as params (W&B syntax) or as the text ``hparams`` (TensorBoard syntax)."""
    cfg = load_config(
        REPO / "configs" / "fedavg_digits_tb_syntax_to_mlflow.yaml",
        [
            f"learner_args.log_syntax={syntax}",
            f"num_rounds={ROUNDS}",
            "local_epochs=1",
            "resources.client_cpus=0.25",
            "resources.server_cpus=0.25",
            "resources.workers=1",  # both sites in one process: PyTorch is imported once for them
            "tracking.log_model=false",
        ],
    )  # the best model is tested in test_model_logging.py
    result = run_job(cfg, workspace=workspace, show_progress=False)
    info = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    assert len(cfg.site_names) == 2
    for site in cfg.site_names:
        run_id = info["run_ids"][site]
        loss_steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
        assert loss_steps == list(range(len(loss_steps))) and len(loss_steps) % ROUNDS == 0 and loss_steps
        assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == list(range(ROUNDS))
        params = client.get_run(run_id).data.params
        if syntax == "wandb":
            assert params["lr"] == "0.05" and params["model"] == "digits_cnn"
        else:
            assert not params
            text = Path(client.download_artifacts(run_id, "hparams", str(tmp_path))).read_text()
            assert "| lr | 0.05 |" in text and "| model | digits_cnn |" in text
