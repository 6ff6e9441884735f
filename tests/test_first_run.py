"""What a new user sees: `fl-ray run` with its output piped, the summary's commands pasted as printed, the
end-of-job picture and participation table, and `fl-ray ui`. One tiny job (2 sites, 2 rounds, synthetic
data, all three receivers; site-2 fails round 2) serves every check."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fl_ray.importing import import_object
from fl_ray.job_summary import FAILED, NOT_SAMPLED, TOOK_PART, participation

from conftest import REPO, new_workspace

CLI = [sys.executable, "-m", "fl_ray.cli"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_every_command_has_help():
    """`fl-ray --help` lists run, replay and ui; each one's --help names its options."""
    top = _cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("run", "replay", "ui")), top.stdout + top.stderr
    for command, options in {
        "run": ["--config", "--set", "--resume", "--workspace", "--verbose"],
        "replay": ["job_dir", "--to", "--tracking-uri", "--dead-letters"],
        "ui": ["--workspace", "--job", "--port"],
    }.items():
        proc = _cli(command, "--help")
        assert proc.returncode == 0 and all(o in proc.stdout for o in options), proc.stdout + proc.stderr


def test_the_console_script_entry_point_is_the_cli():
    """setup.cfg's console_scripts names `fl-ray`, and its target imports as a callable (after
    `pip install -e .`, the environment's bin/fl-ray calls it)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in setup["options.entry_points"]["console_scripts"].split("\n") if line)
    target = import_object(scripts["fl-ray "].strip(), "console_scripts")
    assert callable(target) and target.__module__ == "fl_ray.cli"


def test_an_empty_receiver_list_says_tracking_is_off():
    """`tracking.receivers: []` is allowed, and said: tracking is off (the job then stops on a bad learner
    argument, before Ray starts)."""
    proc = _cli("run", "--set", "tracking.receivers=[]", "--set", "learner_args={bogus: 1}")
    assert proc.returncode == 2 and "tracking is off" in proc.stderr and "learner_args.bogus" in proc.stderr


def test_participation_tells_took_part_failed_and_not_sampled():
    """A sampled site that returned took part, one that did not failed, the rest were not sampled."""
    rounds = [
        {"round": 1, "sampled": ["a", "b"], "completed": ["a", "b"]},
        {"round": 2, "sampled": ["a", "c"], "completed": ["c"]},
    ]
    assert participation(["a", "b", "c"], rounds) == {
        "rounds": [1, 2],
        "sites": {"a": [TOOK_PART, FAILED], "b": [TOOK_PART, NOT_SAMPLED], "c": [NOT_SAMPLED, TOOK_PART]},
    }


@pytest.fixture(scope="module")
def piped_job(ray_session, tmp_path_factory, mlflow_store):
    """`fl-ray run` with stdout and stderr going to a pipe; (output, result.json, workspace)."""
    ws = new_workspace(tmp_path_factory.mktemp("a-workspace-with-a-long-enough-name-to-pass-80-columns"), mlflow_store)
    args = [
        "--workspace",
        str(ws),
        "--address",
        ray_session.get_runtime_context().gcs_address,
        "--set",
        "name=first-run",
        "--set",
        "num_rounds=2",
        "--set",
        "sites=2",
        "--set",
        "min_clients=1",
        "--set",
        "dataset={name: synthetic, num_samples: 100}",
        "--set",
        "learner=user_learners:FaultyLearner",
        "--set",
        "learner_args={faults: {'site-2:2': raise}}",
        "--set",
        "round_retries=0",
        "--set",
        "resources={client_cpus: 0.25, server_cpus: 0.25}",
        "--set",
        "tracking.system_metrics_interval=3600",
        "--set",
        "tracking.receivers=[{type: mlflow}, {type: tensorboard}, {type: wandb}]",
    ]
    proc = subprocess.run(
        [*CLI, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout
    job_dir = next(p for p in ws.iterdir() if p.is_dir() and p.name.startswith("first-run"))
    return proc.stdout, json.loads((job_dir / "result.json").read_text()), ws


def _line(out: str, label: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(label)]
    assert len(lines) == 1, f"expected one {label!r} line in:\n{out}"
    return lines[0]


def _runs(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"


def test_piped_output_is_plain_and_quiet(piped_job):
    """No colour codes, none of Ray's start-up messages, no line broken by the console, and the no-GPU note
    at most once for the whole job (not once per site)."""
    out = piped_job[0]
    assert "\x1b[" not in out
    assert "Token authentication" not in out and "Started a local Ray instance" not in out
    assert out.count("no GPU metrics") <= 1, out
    mlflow_line = _line(out, "MLflow:")
    assert len(mlflow_line) > 100 and mlflow_line.rstrip().endswith("mlflow.db"), mlflow_line


def test_the_summary_commands_work_pasted_into_a_new_shell(piped_job):
    """The MLflow, TensorBoard and W&B lines name executables by full path, of this environment, that run;
    `mlflow ui`'s store is the one holding the job's runs; TensorBoard's folder holds each site's events;
    the W&B folder holds the offline runs `wandb sync` is told to upload."""
    from mlflow.tracking import MlflowClient

    out, result, _ = piped_job
    bin_dir = Path(sys.executable).parent
    ui = shlex.split(_line(out, "MLflow:").split("view with: ", 1)[1])
    assert Path(ui[0]) == bin_dir / "mlflow" and ui[1] == "ui"
    _runs([ui[0], "ui", "--help"])
    store = ui[ui.index("--backend-store-uri") + 1]
    parent = result["tracking"]["receivers"]["mlflow"]["parent_run_id"]
    assert MlflowClient(store).get_run(parent).info.run_name == result["job_id"]

    tensorboard = shlex.split(_line(out, "TensorBoard:").split("view with: ", 1)[1])
    assert Path(tensorboard[0]) == bin_dir / "tensorboard" and tensorboard[1] == "--logdir"
    _runs([tensorboard[0], "--help"])
    assert {p.parent.name for p in Path(tensorboard[2]).rglob("events.out.tfevents.*")} >= {"site-1", "site-2"}

    wandb = _line(out, "W&B:")
    runs_dir = Path(wandb.split("offline runs in ", 1)[1].split(";", 1)[0])
    sync = shlex.split(wandb.split("upload with: ", 1)[1].replace("offline-run-*", "offline-run-x"))
    assert Path(sync[0]) == bin_dir / "wandb" and sync[1] == "sync"
    assert Path(sync[2]).parent == runs_dir and len(list(runs_dir.glob("offline-run-*"))) >= 2
    _runs([sync[0], "sync", "--help"])


def test_the_job_leaves_a_picture_and_a_participation_table(piped_job, monkeypatch):
    """summary.png is a real image in the job directory, its path printed, the same file on the parent run;
    who took part and who failed is in result.json and in the parent run's participation table."""
    import matplotlib.image
    from mlflow.tracking import MlflowClient

    out, result, _ = piped_job
    picture = Path(_line(out, "picture:").split(None, 1)[1])
    assert picture == Path(result["picture"]) == Path(result["job_dir"]) / "summary.png"
    height, width, _ = matplotlib.image.imread(picture).shape
    assert height > 200 and width > 200
    info = result["tracking"]["receivers"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    logged = client.download_artifacts(info["parent_run_id"], "summary.png")
    assert Path(logged).read_bytes() == picture.read_bytes()

    expected = {"rounds": [1, 2], "sites": {"site-1": [TOOK_PART, TOOK_PART], "site-2": [TOOK_PART, FAILED]}}
    assert result["participation"] == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", info["tracking_uri"])  # load_table searches runs through it
    table = client.load_table(info["experiment_id"], "participation.json", run_ids=[info["parent_run_id"]])
    assert table.to_dict("list") == {
        "site": ["site-1", "site-2"],
        "round 1": [TOOK_PART, TOOK_PART],
        "round 2": [TOOK_PART, FAILED],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fl_ray_ui_serves_the_workspaces_runs(piped_job):
    """`fl-ray ui --workspace` starts MLflow's UI on the workspace's store and prints its URL; the job's run
    is there."""
    from mlflow.tracking import MlflowClient

    _, result, ws = piped_job
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "ui", "--workspace", str(ws), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        url = ""
        while not url:
            line = proc.stdout.readline()
            assert line, "fl-ray ui ended without printing a URL"
            url = line.split("open ", 1)[1].split()[0] if line.startswith("open http") else ""
        assert url == f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the UI did not answer"
                time.sleep(0.5)
        run = MlflowClient(url).get_run(result["tracking"]["receivers"]["mlflow"]["parent_run_id"])
        assert run.info.run_name == result["job_id"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_stopped_jobs_summary_says_how_to_resume(tmp_path):
    """The summary of a job stopped by Ctrl+C (from its result.json) ends with the command that resumes it:
    the environment's fl-ray (or python -m fl_ray.cli) with the real job directory; a finished job's has none."""
    import io

    from rich.console import Console

    from fl_ray.cli import print_summary

    job_dir = tmp_path / "my job-20260101"
    result = {"job_id": job_dir.name, "job_dir": str(job_dir), "status": "KILLED", "rounds": [], "tracking": {}}
    text = io.StringIO()
    print_summary(result, Console(file=text, width=60, soft_wrap=True), [])
    resume = shlex.split(_line(text.getvalue(), "resume:").split(None, 1)[1])
    assert resume[-3:] == ["run", "--resume", str(job_dir)]
    assert resume[0] in (str(Path(sys.executable).parent / "fl-ray"), sys.executable)
    finished = io.StringIO()
    print_summary({**result, "status": "FINISHED"}, Console(file=finished, width=60, soft_wrap=True), [])
    assert "resume" not in finished.getvalue()
