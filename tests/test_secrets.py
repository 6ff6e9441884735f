"""Tracking credentials reach the receiver actor and nothing else.

Unit checks of the masking and of the credentials file, then a real job per mode (a local Ray the job
starts here; a driver joining the two-node cluster, with its dashboard, in test_cluster.py) with three
planted secrets: one on the command line (``--set tracking.credentials...``), one in the driver's
environment, one in ``tracking.credentials_file``. While the sites wait in round 1, the test reads the
environment and command line of every process of that Ray but the receiver actor's (and, on the
cluster, Ray's state API: actors, jobs, tasks, workers, runtime envs, ...); after the job, every file
of the workspace (config.yaml, result.json, the MLflow store, the spool) and of Ray's temp dir
(session logs), and the driver's output. None may hold a secret; the receiver actor must hold all three.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fl_ray.config import ConfigError, load_config, parse_config
from fl_ray.tracking.credentials import (
    ReceiverCredentials,
    argv_secrets,
    mask,
    masked_argv,
    read_credentials_file,
    receiver_credentials,
    without_credentials,
)
from user_learners import KnownValuesLearner

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
JOB_TIMEOUT = 90
NAMES = ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"]


def test_command_line_secrets_are_masked():
    """Credential keys and values, credential-looking keys and URL passwords are masked; the rest stays."""
    argv = [
        "run_fedavg.py",
        "--set",
        "tracking.credentials.MLFLOW_TRACKING_PASSWORD=pw-1",
        "--set=tracking.credentials={MLFLOW_TRACKING_TOKEN: tok-2, WANDB_API_KEY: 31337}",
        "--set",
        "tracking.receivers.0.api_key=key-3",
        "--address",
        "ray://ann:pw-4@head:10001",
        "--set",
        "learner_args.tokenizer=bert",
        "--set",
        "num_rounds=3",
        "--workspace=/ws",
    ]
    assert masked_argv(argv) == [
        "run_fedavg.py",
        "--set",
        "tracking.credentials.MLFLOW_TRACKING_PASSWORD=***",
        "--set=tracking.credentials=***",
        "--set",
        "tracking.receivers.0.api_key=***",
        "--address",
        "ray://ann:***@head:10001",
        "--set",
        "learner_args.tokenizer=bert",
        "--set",
        "num_rounds=3",
        "--workspace=/ws",
    ]
    found = argv_secrets(argv)
    assert {"pw-1", "tok-2", "31337", "key-3", "pw-4"} <= set(found) and "bert" not in found
    assert mask("got 31337 ('tok-2') from https://ann:pw-9@host", found) == "got *** ('***') from https://ann:***@host"


def _run_fedavg_main():
    spec = importlib.util.spec_from_file_location("run_fedavg", REPO / "scripts" / "run_fedavg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "tracking.credentials.MLFLOW_TRACKING_PASSWORD=987654321"],  # YAML reads an int: not a string
        ["--set", "tracking.credentials.MLFLOW_TRACKING_PASSWORD=[987654321"],  # not YAML
        ["--bogus", "tracking.credentials.MLFLOW_TRACKING_PASSWORD=987654321"],  # argparse's own error
    ],
)
def test_the_command_line_never_echoes_a_secret(capsys, args):
    """A bad command line names what is wrong, with the secret masked, and stops with status 2."""
    try:
        status = _run_fedavg_main()(args)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and "987654321" not in err and "***" in err, err


def test_the_credentials_file(tmp_path):
    """NAME=value lines (export, quotes and comments allowed); errors name lines, never values; the file
    wins over the driver's environment, tracking.credentials over the file; the repr shows no value."""
    path = tmp_path / "creds.env"
    path.write_text(
        "# for the receiver\nexport MLFLOW_TRACKING_USERNAME='ann'\n\n"
        'MLFLOW_TRACKING_PASSWORD = "p=w #1"\nMLFLOW_TRACKING_TOKEN=tok\n'
    )
    assert read_credentials_file(str(path)) == {
        "MLFLOW_TRACKING_USERNAME": "ann",
        "MLFLOW_TRACKING_PASSWORD": "p=w #1",
        "MLFLOW_TRACKING_TOKEN": "tok",
    }
    creds = ReceiverCredentials(
        {"MLFLOW_TRACKING_TOKEN": "from-env", "WANDB_API_KEY": "from-env"},
        {"MLFLOW_TRACKING_PASSWORD": "from-config"},
        str(path),
    )
    assert pickle.loads(pickle.dumps(creds)).resolve() == {
        "MLFLOW_TRACKING_TOKEN": "tok",
        "WANDB_API_KEY": "from-env",
        "MLFLOW_TRACKING_USERNAME": "ann",
        "MLFLOW_TRACKING_PASSWORD": "from-config",
    }
    assert "from-" not in repr(creds) and "from-" not in str(creds)

    path.write_text("MLFLOW_TRACKING_PASSWORD=ok\nleaked-secret\nAWS_SECRET_ACCESS_KEY=leaked-too\n")
    with pytest.raises(ValueError) as info:
        read_credentials_file(str(path))
    assert "line 2" in str(info.value) and "line 3" in str(info.value) and "leaked" not in str(info.value)


def test_credentials_file_checks_before_the_receiver_starts(tmp_path, monkeypatch):
    """The path must be absolute (or ~/...); a missing file is a ConfigError; the driver's credential
    variables are taken along; ``without_credentials`` hides them for a block only."""
    with pytest.raises(ConfigError, match="credentials_file.*absolute"):
        parse_config({"tracking": {"credentials_file": "creds.env"}})
    assert load_config(None, ["tracking.credentials_file=~/creds.env"]).tracking.credentials_file == "~/creds.env"
    with pytest.raises(ConfigError, match="no such file"):
        receiver_credentials({}, str(tmp_path / "missing.env"))
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "driver-token")
    (tmp_path / "creds.env").write_text("")
    creds = receiver_credentials({"WANDB_API_KEY": "k"}, str(tmp_path / "creds.env"))
    assert creds.resolve() == {"MLFLOW_TRACKING_TOKEN": "driver-token", "WANDB_API_KEY": "k"}
    with without_credentials():
        assert "MLFLOW_TRACKING_TOKEN" not in os.environ
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "driver-token"


class GatedLearner(KnownValuesLearner):
    """KnownValuesLearner whose round 1 says it started (``<gate>/ready-<site>``) and waits for ``<gate>/go``."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = Path(gate)

    def train(self, weights, ctx):
        if ctx.round == 1:
            (self.gate / f"ready-{ctx.site}").touch()
            deadline = time.monotonic() + JOB_TIMEOUT
            while not (self.gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return super().train(weights, ctx)


STATE_DUMP = """
import json, sys
from ray.util import state
calls = ["list_actors", "list_jobs", "list_tasks", "list_workers", "list_runtime_envs", "list_nodes",
         "list_objects", "list_placement_groups", "list_cluster_events"]
print(json.dumps({c: getattr(state, c)(address=sys.argv[1], detail=True, raise_on_missing_output=False)
                  for c in calls}, default=lambda o: getattr(o, "__dict__", str(o))))
"""


def _leaks(data: bytes, planted: dict[str, str]) -> list[str]:
    """The names of the planted secrets that ``data`` holds."""
    return [name for name, value in planted.items() if value.encode() in data]


def _process_leaks(procs: list[psutil.Process], planted: dict[str, str]) -> tuple[dict[str, list[str]], list[int]]:
    """Which secrets the environment or command line of each process holds, except the receiver actor's
    process and its children; also the receiver actor's pids."""
    receivers = []
    for p in procs:
        try:
            if any("ReceiverActor" in part for part in p.cmdline()):
                receivers.append(p)
        except psutil.Error:
            continue
    skip = {p.pid for r in receivers for p in [r, *r.children(recursive=True)]}
    found = {}
    for p in procs:
        if p.pid in skip:
            continue
        try:
            data = Path(f"/proc/{p.pid}/environ").read_bytes() + Path(f"/proc/{p.pid}/cmdline").read_bytes()
            name = " ".join(p.cmdline())[:80]
        except (OSError, psutil.Error):
            continue  # ended meanwhile
        if _leaks(data, planted):
            found[f"{p.pid} {name}"] = _leaks(data, planted)
    return found, [r.pid for r in receivers]


def _file_leaks(root: Path, planted: dict[str, str]) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and _leaks(path.read_bytes(), planted):
                found[str(path)] = _leaks(path.read_bytes(), planted)
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_credentials_reach_the_receiver_actor_only_on_a_local_ray(tmp_path, mlflow_store, request):
    """Planted on the command line, in the driver's environment and in the credentials file, the secrets
    reach the receiver actor (also after Ray restarts it) and no other process, file or log of the Ray the
    job starts."""
    check_credentials_reach_the_receiver_actor_only(None, tmp_path, mlflow_store, request)


def check_credentials_reach_the_receiver_actor_only(head, tmp_path, mlflow_store, request) -> None:
    """Run the gated job on ``head`` (a cluster) or on a Ray of its own (None) and look for the secrets."""
    from conftest import new_workspace  # not at module level: the job imports this module (its learner),
    # and conftest takes credential variables out of the environment of whoever imports it

    planted = {
        "--set": f"planted-set-{secrets.token_hex(8)}",
        "environment": f"planted-env-{secrets.token_hex(8)}",
        "file": f"planted-file-{secrets.token_hex(8)}",
    }
    creds = tmp_path / "creds.env"
    creds.write_text(f"MLFLOW_TRACKING_USERNAME={planted['file']}\n")
    creds.chmod(0o600)
    gate = tmp_path / "gate"
    gate.mkdir()
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "secrets",
                "num_rounds": 1,
                "sites": 2,
                "min_clients": 2,
                "dataset": {"name": "synthetic", "num_samples": 100},
                "learner": "test_secrets:GatedLearner",
                "learner_args": {"gate": str(gate)},
                "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
                "tracking": {
                    "receivers": [{"type": "mlflow"}, {"type": "user_receivers:CredentialProbe"}],
                    "credentials_file": str(creds),
                    "system_metrics": False,
                    "log_model": False,
                },
            }
        )
    )
    workspace = new_workspace(tmp_path / "ws", mlflow_store)
    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    ray_tmp = Path(head.temp_dir) if head else Path(tempfile.mkdtemp(prefix="flrs-", dir="/tmp"))
    if not head:
        request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = dict(head.env) if head else {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PYTHONPATH=str(TESTS),
        MLFLOW_TRACKING_TOKEN=planted["environment"],
        **({} if head else {"RAY_TMPDIR": str(ray_tmp)}),
    )
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "run_fedavg.py"),
        "--config",
        str(config),
        "--workspace",
        str(workspace),
        "--quiet",
        "--set",
        f"tracking.credentials.MLFLOW_TRACKING_PASSWORD={planted['--set']}",
        *(["--address", head.gcs_address] if head else []),
    ]
    output = tmp_path / "driver.out"
    with output.open("wb") as out:
        driver = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(list(gate.glob("ready-*"))) < 2:
            assert driver.poll() is None, f"the job ended early:\n{output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the sites did not start:\n{output.read_text()[-3000:]}"
            time.sleep(0.2)

        # The job runs: every process of its Ray (the driver, whose user gave it the secrets, aside).
        def processes() -> list[psutil.Process]:
            return head.processes() if head else psutil.Process(driver.pid).children(recursive=True)

        leaks, receivers = _process_leaks(processes(), planted)
        assert len(receivers) == 1 and not leaks, (receivers, leaks)
        if head:
            state = subprocess.run(
                [sys.executable, "-c", STATE_DUMP, head.dashboard_url],
                env=head.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert state.returncode == 0, state.stderr[-3000:]
            dump = json.loads(state.stdout)
            assert any(a["class_name"] == "ReceiverActor" for a in dump["list_actors"]) and dump["list_jobs"]
            leaks = {call: _leaks(json.dumps(items).encode(), planted) for call, items in dump.items()}
            assert not any(leaks.values()), leaks
            assert "MLFLOW_TRACKING_PASSWORD=***" in json.dumps(dump["list_jobs"])  # the driver's entrypoint
        os.kill(receivers[0], signal.SIGKILL)  # Ray restarts it: it must get its credentials again
        while True:
            leaks, restarted = _process_leaks(processes(), planted)
            if restarted and restarted != receivers:
                break
            assert time.monotonic() < deadline, "Ray did not restart the receiver actor"
            time.sleep(0.2)
        assert not leaks, leaks
        (gate / "go").touch()
        assert driver.wait(JOB_TIMEOUT) == 0, output.read_text()[-3000:]
    finally:
        (gate / "go").touch()
        if driver.poll() is None:
            for p in [*psutil.Process(driver.pid).children(recursive=True), driver]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            driver.wait()

    result = json.loads(next(workspace.glob("secrets-*/result.json")).read_text())
    assert result["tracking"]["receivers"]["user_receivers_CredentialProbe"]["credentials"] == NAMES  # restarted
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["tracking"]["receivers"]["mlflow"]["tracking_uri"])
    parent = client.get_run(result["tracking"]["receivers"]["mlflow"]["parent_run_id"])
    assert "tracking.credentials.MLFLOW_TRACKING_PASSWORD=***" in parent.data.tags["fl_ray.command"]
    for run_id in [parent.info.run_id, *result["tracking"]["receivers"]["mlflow"]["run_ids"].values()]:
        run = client.get_run(run_id)
        assert not _leaks(json.dumps([run.data.tags, run.data.params]).encode(), planted)
        assert run.data.tags.get("credentials_seen", "none") == "none"  # the sites held none
    assert not _leaks(output.read_bytes(), planted)
    assert not _file_leaks(workspace, planted)
    assert not _file_leaks(ray_tmp, planted)
