"""Writers: validation at the call site, step semantics of each syntax, and the events they produce.

The writers run on a real EventSender whose batch size and interval are set so that nothing leaves
the buffer during a test; the buffer is then inspected.
"""

import math

import numpy as np
import pytest
import torch

from fl_ray.tracking.events import EventKind
from fl_ray.tracking.sender import EventSender
from fl_ray.tracking.state import SiteState
from fl_ray.tracking.writers import MLflowWriter, SummaryWriter, WandBWriter


class _Unreachable:
    """A receiver handle the sender must not call during these tests."""

    def __getattr__(self, name):
        raise AssertionError("the sender tried to send during a buffer-only test")


@pytest.fixture
def sender():
    s = EventSender("site-1", _Unreachable(), batch_size=10**9, flush_interval=3600)
    yield s
    with s._cond:
        s._closed = True
        s._cond.notify_all()


def events(sender, kind=None):
    return [e for e in sender._buffer if kind is None or e.kind == kind]


def test_log_metric_appends_one_event_with_site_seq_and_client_timestamp(sender):
    """A metric call becomes one METRIC event stamped with the site, a fresh seq and the given timestamp."""
    w = MLflowWriter(sender)
    w.log_metric("loss", 0.5, step=3, timestamp=1_700_000_000_000)
    w.log_metric("loss", np.float32(0.25), step=4)
    w.log_metric("loss", torch.tensor(0.125), step=5)
    e0, e1, e2 = events(sender)
    assert (e0.site, e0.seq, e0.kind, e0.key, e0.value, e0.step, e0.timestamp) == (
        "site-1",
        0,
        EventKind.METRIC,
        "loss",
        0.5,
        3,
        1_700_000_000_000,
    )
    assert (e1.seq, e1.value, e1.step) == (1, 0.25, 4) and isinstance(e1.value, float)
    assert (e2.seq, e2.value, e2.step) == (2, 0.125, 5)
    assert e1.timestamp > 1_700_000_000_000


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda w: w.log_metric("acc", "high"), TypeError, ["'acc'", "'high'", "real number"]),
        (lambda w: w.log_metric("acc", None), TypeError, ["'acc'", "None"]),
        (lambda w: w.log_metric("acc", [1.0]), TypeError, ["'acc'", "[1.0]"]),
        (lambda w: w.log_metric("bad key!", 1.0), ValueError, ["'bad key!'", "not a valid name"]),
        (lambda w: w.log_metric("a/../b", 1.0), ValueError, ["'a/../b'"]),
        (lambda w: w.log_metric("x" * 251, 1.0), ValueError, ["1-250 characters"]),
        (lambda w: w.log_metric(7, 1.0), TypeError, ["metric name", "7"]),
        (lambda w: w.log_metric("acc", 1.0, step=-1), ValueError, ["'acc'", "-1", "non-negative"]),
        (lambda w: w.log_metric("acc", 1.0, step=1.5), TypeError, ["'acc'", "1.5"]),
        (lambda w: w.log_params({"p": {"nested": 1}}), TypeError, ["'p'", "scalar"]),
        (lambda w: w.set_tag("t", "v" * 9000), ValueError, ["'t'", "9000 characters"]),
        (lambda w: w.log_text(b"bytes", "a.txt"), TypeError, ["'a.txt'", "string"]),
    ],
)
def test_invalid_calls_raise_at_the_call_naming_key_and_value(sender, call, error, words):
    """Bad input raises TypeError/ValueError at the call, naming what was wrong; nothing is buffered."""
    w = MLflowWriter(sender)
    w.log_metric("before", 1.0)
    with pytest.raises(error) as err:
        call(w)
    for word in words:
        assert word in str(err.value)
    assert [e.key for e in events(sender)] == ["before"]


def test_nan_and_infinity_are_accepted_as_mlflow_does(sender):
    """NaN and +/-inf are numbers MLflow stores."""
    w = MLflowWriter(sender)
    w.log_metrics({"a": float("nan"), "b": float("inf"), "c": -float("inf")}, step=0)
    values = [e.value for e in events(sender)]
    assert math.isnan(values[0]) and values[1:] == [float("inf"), -float("inf")]


def test_log_metrics_is_all_or_nothing(sender):
    """One bad value in log_metrics logs none of the batch."""
    w = MLflowWriter(sender)
    with pytest.raises(TypeError, match="'b'"):
        w.log_metrics({"a": 1.0, "b": "x", "c": 3.0}, step=1)
    assert events(sender) == []


def test_param_cannot_change_but_may_be_repeated(sender):
    """Re-logging a param with the same value is a no-op; another value is an error naming both."""
    w = MLflowWriter(sender)
    assert w.log_param("lr", 0.1) == 0.1
    w.log_param("lr", 0.1)
    with pytest.raises(ValueError) as err:
        w.log_param("lr", 0.2)
    assert "'lr'" in str(err.value) and "'0.1'" in str(err.value) and "'0.2'" in str(err.value)
    assert [(e.kind, e.key, e.value) for e in events(sender)] == [(EventKind.PARAM, "lr", "0.1")]


def test_tags_params_and_text_events(sender):
    """Params and tags are stored as strings; texts keep their artifact file name."""
    w = MLflowWriter(sender)
    w.log_params({"bs": 32, "opt": "sgd"})
    w.set_tags({"role": "client", "n": 3})
    w.log_text("hello", "notes/hello.txt")
    got = [(e.kind, e.key, e.value, e.step) for e in events(sender)]
    assert got == [
        (EventKind.PARAM, "bs", "32", None),
        (EventKind.PARAM, "opt", "sgd", None),
        (EventKind.TAG, "role", "client", None),
        (EventKind.TAG, "n", "3", None),
        (EventKind.TEXT, "notes/hello.txt", "hello", None),
    ]


def test_default_steps_continue_per_key(sender):
    """step=None: one past the largest step of that key so far, never restarting (curves continue)."""
    w = MLflowWriter(sender)
    w.log_metric("loss", 1.0)
    w.log_metric("loss", 1.0)
    w.log_metric("acc", 1.0)
    w.log_metric("loss", 1.0, step=10)
    w.log_metric("loss", 1.0)
    w.log_metric("loss", 1.0, step=2)  # an explicit lower step is kept as given ...
    w.log_metric("loss", 1.0)  # ... and does not pull the counter back
    assert [(e.key, e.step) for e in events(sender)] == [
        ("loss", 0),
        ("loss", 1),
        ("acc", 0),
        ("loss", 10),
        ("loss", 11),
        ("loss", 2),
        ("loss", 12),
    ]


def test_sender_resumes_the_state_it_is_given():
    """A restarted site continues from the state the receiver actor hands back: seqs of its new incarnation,
    step counters, and params already logged (the same value again logs nothing; another one is refused)."""
    state = SiteState.from_snapshot("site-2", {"incarnation": 5, "steps": {"loss": 40}, "params": {"lr": "0.1"}})
    s = EventSender(state, _Unreachable(), batch_size=10**9, flush_interval=3600)
    writer = MLflowWriter(s)
    writer.log_metric("loss", 1.0)
    writer.log_param("lr", 0.1)
    assert [(e.seq, e.key, e.step) for e in s._buffer] == [(5 << 32, "loss", 40)]
    with pytest.raises(ValueError, match="param 'lr' was already logged for site 'site-2' with value '0.1'"):
        WandBWriter(s).config.update({"lr": 0.2})
    s._closed = True


def test_summary_writer_maps_scalars_and_text(sender):
    """add_scalar -> metric; add_scalars -> main_tag/key metrics grouped by main_tag; walltime -> ms."""
    w = SummaryWriter(sender)
    w.add_scalar("loss", 0.5, global_step=1, walltime=1_700_000_000.25)
    w.add_scalars("acc", {"train": 0.9, "val": 0.8}, global_step=2)
    w.add_text("note", "hi", global_step=3)
    got = [(e.kind, e.key, e.value, e.step, e.group) for e in events(sender)]
    assert got == [
        (EventKind.METRIC, "loss", 0.5, 1, None),
        (EventKind.METRIC, "acc/train", 0.9, 2, "acc"),
        (EventKind.METRIC, "acc/val", 0.8, 2, "acc"),
        (EventKind.TEXT, "note", "hi", 3, None),
    ]
    assert events(sender)[0].timestamp == 1_700_000_000_250
    with pytest.raises(TypeError, match="'acc/x'"):
        w.add_scalars("acc", {"x": "nope"})


def test_wandb_writer_follows_wandb_step_semantics(sender):
    """Each committed log advances the step; commit=False stays; an explicit lower step is kept."""
    w = WandBWriter(sender)
    w.log({"a": 1})
    w.log({"a": 2}, commit=False)
    w.log({"b": 3})
    w.log({"a": 4}, step=10)
    w.log({"b": 5})
    w.log({"a": 6}, step=3)
    w.log({"nested": {"x": 7}})
    got = [(e.key, e.value, e.step) for e in events(sender)]
    assert got == [
        ("a", 1.0, 0),
        ("a", 2.0, 1),
        ("b", 3.0, 1),
        ("a", 4.0, 10),
        ("b", 5.0, 10),
        ("a", 6.0, 3),
        ("nested/x", 7.0, 11),
    ]


def test_wandb_config_logs_params(sender):
    """wandb-style config.update and item assignment become params (nested keys joined by '.')."""
    w = WandBWriter(sender)
    w.config.update({"lr": 0.1, "opt": {"name": "sgd"}})
    w.config["epochs"] = 2
    assert [(e.kind, e.key, e.value) for e in events(sender)] == [
        (EventKind.PARAM, "lr", "0.1"),
        (EventKind.PARAM, "opt.name", "sgd"),
        (EventKind.PARAM, "epochs", "2"),
    ]
