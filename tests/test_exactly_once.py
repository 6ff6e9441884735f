"""Exactly once into every back end, under real faults: the receiver actor killed again and again under
heavy logging, killed while closing, a full disk under the spool, and the driver killed with SIGKILL then
resumed. Every (site, key, step) is counted in MLflow, TensorBoard event files and W&B offline runs."""

import json
import os
import random
import signal
import time
from collections import Counter

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from fl_ray.actors.receiver import receiver_actor_name
from fl_ray.tracking.spool import load_progress, spooled_events

from conftest import NO_DATA, new_workspace, start_job_process
from test_delivery_faults import (
    JobThread,
    SITES,
    assert_learner_records_in_mlflow,
    forwarded_output,
    stream_config,
    wait_for,
)
from test_tracking_matrix import _f32, tensorboard_series, wandb_series
from user_learners import expected_stream

pytestmark = pytest.mark.slow

ALL_BACK_ENDS = [
    {"type": "mlflow", "buffer_flush_time": 0.2},
    {"type": "tensorboard", "flush_secs": 0.3},
    {"type": "wandb", "mode": "offline", "buffer_flush_time": 0.5},
]


def actor_pid(actor) -> int | None:
    """The actor's process id, or None while it is dead or restarting."""
    try:
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def mlflow_steps(tracking_uri, run_ids, key):
    """{site: Counter of (step, value)} for ``key`` in each site's run."""
    client = MlflowClient(tracking_uri)
    return {
        site: Counter((m.step, _f32(m.value)) for m in client.get_metric_history(run_ids[site], key)) for site in SITES
    }


def assert_every_record_once(job_dir, mlflow, rounds, points):
    """Each site's stream and stream_neg points are in MLflow, TensorBoard and W&B exactly once."""
    tb, wb = tensorboard_series(job_dir), wandb_series(job_dir)
    for key, sign in (("stream", 1), ("stream_neg", -1)):
        in_mlflow = mlflow_steps(mlflow["tracking_uri"], mlflow["run_ids"], key)
        for site in SITES:
            expected = sorted((step, _f32(value)) for step, value in expected_stream(site, rounds, points, sign))
            twice = [item for item, n in in_mlflow[site].items() if n > 1]
            assert not twice, f"MLflow {site} {key}: written twice: {twice[:5]}"
            assert sorted(in_mlflow[site]) == expected, f"MLflow {site} {key}: records missing"
            assert tb[site][key] == expected, f"TensorBoard {site} {key}: {_diff(tb[site][key], expected)}"
            assert wb[site][key] == expected, f"W&B {site} {key}: {_diff(wb[site][key], expected)}"


def _diff(got, expected):
    seen = Counter(got)
    return (
        f"{sum(n - 1 for n in seen.values() if n > 1)} twice, "
        f"{len(set(expected) - set(seen))} missing of {len(expected)}"
    )


def test_receiver_actor_killed_at_random_moments_every_back_end_holds_every_record_once(ray_session, workspace):
    """The receiver actor is killed four times at random moments while sites log heavily (mid-write,
    mid-flush, between a flush and its mark, whatever the moment is); Ray restarts it each time. MLflow,
    the TensorBoard event files and the W&B runs then hold every point once: none missing, none twice."""
    rounds, points = 6, 120
    job = JobThread(stream_config("kills", rounds, points, 3.0, ALL_BACK_ENDS), workspace)
    job.start()
    job_dir = job.job_dir()
    actor = ray.get_actor(receiver_actor_name(job_dir.name))
    rng, kills = random.Random(11), 0
    wait_for(lambda: load_progress(job_dir / "spool", "wandb")["events"] > 0, 120, "the first W&B delivery")
    while kills < 4 and job.is_alive():
        time.sleep(rng.uniform(0.3, 2.5))
        pid = actor_pid(actor)
        if pid is None:  # restarting, or gone with the end of the job
            continue
        ray.kill(actor, no_restart=False)
        kills += 1
        wait_for(
            lambda pid=pid: not job.is_alive() or actor_pid(actor) not in (None, pid),
            120,
            "Ray to restart the receiver",
        )
    result = job.finish(timeout=300)

    assert kills == 4 and result.status == "FINISHED" and len(result.rounds) == rounds
    for name in ("mlflow", "tensorboard", "wandb"):
        entry = result.tracking["receivers"][name]
        assert entry["undelivered"] == 0 and "error" not in entry, (name, entry)
    recorded = sum(s["recorded"] for s in result.tracking["senders"].values())
    assert result.tracking["accepted"] == recorded == len(spooled_events(job_dir / "spool"))
    assert_every_record_once(job_dir, result.tracking["receivers"]["mlflow"], rounds, points)
    assert_learner_records_in_mlflow(
        result.tracking["receivers"]["mlflow"]["tracking_uri"], result.tracking["receivers"]["mlflow"], rounds, points
    )  # params, tags and the server's metrics too
    wandb = result.tracking["receivers"]["wandb"]
    assert sorted(wandb["runs"]) == sorted([*SITES, "server"])  # one run per site, across every restart


def test_a_receiver_actor_dying_while_closing_is_restarted_and_the_job_finishes(ray_session, workspace):
    """The receiver actor is killed (SIGKILL, for real) inside close: Ray restarts it, the job asks it to
    close again, everything is delivered once, result.json is written, and the job ends FINISHED."""
    rounds, points = 2, 40
    cfg = stream_config(
        "close-crash",
        rounds,
        points,
        0.5,
        [{"type": "mlflow", "buffer_flush_time": 0.2}, {"type": "user_receivers:DiesWhileClosing"}],
    )
    result = JobThread(cfg, workspace)
    result.start()
    result = result.finish(timeout=300)
    job_dir = result.job_dir

    assert (job_dir / "died-while-closing").exists(), "the receiver should have died inside close"
    assert result.status == "FINISHED" and result.error is None
    saved = json.loads((job_dir / "result.json").read_text())
    assert saved["status"] == "FINISHED"
    entry = result.tracking["receivers"]["user_receivers_DiesWhileClosing"]
    assert entry["status"] == "FINISHED"  # the restarted actor's close report
    assert entry["delivered"] == result.tracking["accepted"] and entry["undelivered"] == 0
    mlflow = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(mlflow["tracking_uri"])
    for run_id in (mlflow["parent_run_id"], *mlflow["run_ids"].values()):
        assert client.get_run(run_id).info.status == "FINISHED"
    for site, counted in mlflow_steps(mlflow["tracking_uri"], mlflow["run_ids"], "stream").items():
        assert sorted(counted) == sorted((s, _f32(v)) for s, v in expected_stream(site, rounds, points))
        assert set(counted.values()) == {1}


def test_a_full_disk_under_the_spool_loses_nothing(ray_session, workspace, capfd):
    """The spool's file system is full for a few seconds (a real file-size limit on the receiver actor):
    batches that do not fit are not acknowledged, sites keep and resend them, saying why, and once there
    is room every record is delivered exactly once and the job finishes."""
    rounds, points = 3, 200
    cfg = stream_config(
        "full-disk",
        rounds,
        points,
        2.0,
        [{"type": "user_receivers:FullDiskWindow", "seconds": 4.0, "room": 20_000}],
        batch_size=100,
        flush_interval=0.05,
    )
    job = JobThread(cfg, workspace)
    job.start()
    job_dir = job.job_dir()
    lines = forwarded_output(capfd, "File too large", timeout=120)
    result = job.finish(timeout=300)

    # (the limit caps every file the receiver's process writes, Ray's own logs too, so Ray may also restart it)
    warnings = [line for line in lines if "not acknowledged" in line and "SpoolError" in line]
    assert warnings and str(job_dir / "spool" / "events.jsonl") in warnings[0] and "File too large" in warnings[0]
    assert result.status == "FINISHED"
    senders = result.tracking["senders"]
    assert sum(s["retries"] for s in senders.values()) > 0, "some batches should have been refused and resent"
    recorded = sum(s["recorded"] for s in senders.values())
    echo = result.tracking["receivers"]["user_receivers_FullDiskWindow"]["echo"]
    ids = [(e[0], e[1]) for e in echo]
    assert len(ids) == len(set(ids)) == recorded == result.tracking["accepted"]
    assert all(s["undelivered"] == 0 for s in senders.values())


def test_kill_9_then_resume_records_no_step_twice_in_any_back_end(ray_session, tmp_path, mlflow_store):
    """The driver is killed with SIGKILL in the middle of round 2, then the job is resumed: the cut-off round
    runs again with the same explicit steps, and each (key, step) of every site is in MLflow, TensorBoard
    and W&B once (the first life's value stays), with every round's points present."""
    rounds, points = 4, 100
    ws = new_workspace(tmp_path / "ws", mlflow_store)
    config = tmp_path / "stream.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "kill9",
                "num_rounds": rounds,
                "sites": list(SITES),
                "min_clients": 2,
                "learner": "user_learners:StreamLearner",
                "learner_args": {"points": points, "seconds": 3.0},
                "dataset": NO_DATA,
                "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
                "tracking": {"receivers": ALL_BACK_ENDS, "system_metrics": False, "log_model": False},
            }
        )
    )
    proc = start_job_process(ws, "--config", str(config))
    wait_for(lambda: any(ws.glob("*/spool/events.jsonl")), 180, "the job's spool")
    spool = next(ws.glob("*/spool"))
    job_dir = spool.parent
    per_round = 2 * points * len(SITES)
    wait_for(
        lambda: sum(e.key == "stream" for e in spooled_events(spool)) > 1.5 * per_round / 2,
        180,
        "the middle of round 2",
    )
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    name = receiver_actor_name(job_dir.name)
    wait_for(lambda: not _actor_exists(name), 60, "Ray to remove the killed job's actors")

    resumed = start_job_process(ws, "--resume", str(job_dir))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    final = json.loads((job_dir / "result.json").read_text())
    assert final["status"] == "FINISHED" and [r["round"] for r in final["rounds"]] == list(range(1, rounds + 1))
    assert final["tracking"]["spool"]["dropped_after_resume"] > 0, "the cut-off round's steps should repeat"
    assert_every_record_once(job_dir, final["tracking"]["receivers"]["mlflow"], rounds, points)


def _actor_exists(name):
    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True
