"""Site-local tracking: the config is checked before Ray starts, and what a site shares reaches the server's hub
once. The whole path on two nodes (the site's store, the server's store, credentials) is in test_cluster.py."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from fl_ray.actors.receiver import receiver_actor_name, start_receiver
from fl_ray.actors.site_receiver import SHARED_BLOCK, ShareReceiver
from fl_ray.config import ConfigError, parse_config
from fl_ray.job import run_job
from fl_ray.receivers.base import ReceiverContext
from fl_ray.replay import replay
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import SPOOL_DIR, blob_path
from fl_ray.tracking.state import INCARNATION_BITS

from conftest import NO_DATA

HOME = {"site-1": [{"type": "mlflow"}]}


def test_a_site_local_config_parses_and_is_kept_in_config_yaml():
    """site_receivers, share, site_workspace and site_credentials_file are read and written back as given."""
    cfg = parse_config(
        {
            "tracking": {
                "site_receivers": HOME,
                "share": ["val_*", "system/[cg]pu*"],
                "site_workspace": "~/fl",
                "site_credentials_file": {"site-1": "/etc/fl/site-1.env"},
            }
        }
    )
    assert [r.type for r in cfg.tracking.site_receivers["site-1"]] == ["mlflow"]
    tracking = cfg.to_dict()["tracking"]
    assert tracking["site_receivers"] == HOME and tracking["share"] == ["val_*", "system/[cg]pu*"]
    assert tracking["site_credentials_file"] == {"site-1": "/etc/fl/site-1.env"}


@pytest.mark.parametrize(
    "tracking, extra, field, value, expected",
    [
        ({"site_receivers": {"site-3": [{"type": "mlflow"}]}}, {}, "tracking.site_receivers", "'site-3'", "not a site"),
        ({"site_receivers": {"site1": [{"type": "mlflow"}]}}, {}, "tracking.site_receivers", "'site1'", "'site-1'?"),
        ({"site_receivers": {"site-1": []}}, {}, "tracking.site_receivers", "site-1", "one or more receivers"),
        ({"site_receivers": {"site-1": [{"type": "mlfow"}]}}, {}, "site_receivers.site-1.0.type", "'mlfow'", "one of"),
        ({"site_receivers": HOME, "share": ["val_[a"]}, {}, "tracking.share", "'val_[a'", "not closed"),
        ({"site_receivers": HOME, "share": [" "]}, {}, "tracking.share", "' '", "a glob such as"),
        ({"site_receivers": HOME, "share": "val_*"}, {}, "tracking.share", "'val_*'", "a list"),
        ({"share": ["val_*"]}, {}, "tracking.share", "['val_*']", "none are set"),
        ({"site_receivers": HOME, "site_workspace": "sites"}, {}, "tracking.site_workspace", "'sites'", "absolute"),
        (
            {"site_receivers": HOME, "site_credentials_file": {"site-1": "site-1.env"}},
            {},
            "tracking.site_credentials_file",
            "'site-1.env'",
            "absolute",
        ),
        (
            {"site_receivers": HOME, "site_credentials_file": {"site-2": "/site-2.env"}},
            {},
            "tracking.site_credentials_file",
            "'site-2'",
            "has no tracking.site_receivers",
        ),
        (
            {"site_receivers": HOME},
            {"sites": 3, "resources": {"workers": 2}},
            "resources.workers",
            "2",
            "one actor per site",
        ),
    ],
)
def test_bad_site_local_config_names_field_value_and_expectation(tracking, extra, field, value, expected):
    """Each bad site-local setting raises ConfigError naming the field, the value and what is expected."""
    with pytest.raises(ConfigError) as err:
        parse_config({"tracking": tracking, **extra})
    message = str(err.value)
    assert field in message and value in message and expected in message, message


def test_a_site_receiver_that_cannot_be_built_fails_before_ray_starts(tmp_path):
    """A site receiver's bad argument is named by its place in tracking.site_receivers, before Ray starts."""
    config = {
        "dataset": {"name": "synthetic", "num_samples": 100},
        "tracking": {"site_receivers": {"site-2": [{"type": "mlflow", "bogus": 1}]}},
    }
    ray_before = ray.is_initialized()  # another test of the session may have started its Ray
    with pytest.raises(ConfigError, match=r"tracking\.site_receivers\.site-2\.0.*bogus"):
        run_job(config, tmp_path, show_progress=False)
    assert ray.is_initialized() == ray_before and not any(tmp_path.iterdir())  # no Ray started, no job directory


def _metric(seq: int, key: str) -> TrackingEvent:
    return TrackingEvent("site-1", (3 << 32) + seq, EventKind.METRIC, key, float(seq), seq, 1_000 + seq)


def test_shared_records_reach_the_server_once_after_the_site_hub_crashes(ray_session, tmp_path):
    """Only records whose key matches ``share`` go to the server's receiver actor, numbered by their place among
    the shared ones, a shared file into the server's spool first; a site hub that crashed after sending but
    before its mark moved sends them again from its last mark, and the server's hub drops what it already holds."""
    ctx = ReceiverContext(f"share-{os.getpid()}", "share", tmp_path / "server", tmp_path, ("site-1",), {})
    site_ctx = dataclasses.replace(ctx, job_dir=tmp_path / "site")
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = start_receiver(ctx, [{"type": "user_receivers:EchoReceiver"}], {}, here)
    figure = b"\x89PNG a site's figure"
    sha = hashlib.sha256(figure).hexdigest()
    site_blob = blob_path(site_ctx.job_dir / SPOOL_DIR, sha)
    site_blob.parent.mkdir(parents=True)
    site_blob.write_bytes(figure)  # as the site's hub stored it
    try:
        events = [_metric(i, key) for i, key in enumerate(["val_loss", "train_loss", "val_acc", "lr"])]
        events.append(TrackingEvent("site-1", (3 << 32) + 4, EventKind.ARTIFACT, "val_plot.png", sha, None, 1_004))
        first = ShareReceiver(receiver_actor_name(ctx.job_id), ["val_*"], 0.0, batch_size=1)
        first.open(site_ctx)
        first.write(events[:3])
        first.flush()
        assert first.checkpoint() == {"shared": 2}
        again = ShareReceiver(receiver_actor_name(ctx.job_id), ["val_*"], 0.0, batch_size=1)
        again.open(site_ctx)
        again.resume({})  # the mark it restarts from was saved before the first delivery
        again.write(events)
        again.flush()
        assert again.checkpoint() == {"shared": 3}
        assert blob_path(ctx.job_dir / SPOOL_DIR, sha).read_bytes() == figure  # until the server's hub closes
        report = ray.get(actor.close.remote("FINISHED", 60))
    finally:
        ray.kill(actor, no_restart=True)
    echo = report["receivers"]["user_receivers_EchoReceiver"]["echo"]
    base = SHARED_BLOCK << INCARNATION_BITS
    assert [(e[1] - base, e[3], e[4]) for e in echo] == [
        (0, "val_loss", 0.0),
        (1, "val_acc", 2.0),
        (2, "val_plot.png", sha),
    ]
    assert report["accepted"] == 3 and report["duplicates_dropped"] == 2


def test_a_site_receiver_actor_that_dies_while_closing_loses_and_repeats_nothing(ray_session, workspace, tmp_path):
    """site-1's own receiver actor is killed inside its close (a real SIGKILL): Ray restarts it on its node, it
    recovers from the site's spool and is asked to close again; its receiver got every record, and the
    server's receivers got site-1's shared keys once each, besides all of site-2's."""
    cfg = parse_config(
        {
            "name": "site-dies",
            "num_rounds": 2,
            "sites": 2,
            "min_clients": 2,
            "learner": "user_learners:KnownValuesLearner",
            "dataset": NO_DATA,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "tracking": {
                "receivers": [{"type": "user_receivers:EchoReceiver"}],
                "site_receivers": {"site-1": [{"type": "user_receivers:DiesWhileClosing"}]},
                "share": ["known", "pair_*"],
                "site_workspace": str(tmp_path / "home"),
                "system_metrics": False,
                "log_model": False,
            },
        }
    )
    result = run_job(cfg, workspace=workspace, show_progress=False)

    assert result.status == "FINISHED", result.error
    local = result.tracking["site_receivers"]["site-1"]
    assert (Path(local["job_dir"]) / "died-while-closing").exists(), "the site's receiver actor should have died"
    home = local["receivers"]["user_receivers_DiesWhileClosing"]
    assert home["status"] == "FINISHED" and home["delivered"] == local["accepted"] > 6 and home["undelivered"] == 0
    assert local["receivers"]["server"]["shared"] == 6
    echo = [TrackingEvent(*e) for e in result.tracking["receivers"]["user_receivers_EchoReceiver"]["echo"]]
    shared = sorted((e.key, e.step) for e in echo if e.site == "site-1")
    assert shared == [(key, r) for key in ("known", "pair_a", "pair_b") for r in (1, 2)]
    assert {e.key for e in echo if e.site == "site-2"} >= {"known", "auto", "pair_a", "pair_b", "lr"}
    # the site's job directory replays on its node (its own receivers), and sends nothing twice
    replayed = replay(Path(local["job_dir"]), console=Console(file=io.StringIO()))
    assert list(replayed["receivers"]) == ["user_receivers_DiesWhileClosing"]
    assert replayed["receivers"]["user_receivers_DiesWhileClosing"]["replayed"] == 0
