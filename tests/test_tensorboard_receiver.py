"""TensorBoardReceiver against real event files, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from fl_ray.receivers.base import FINISHED, ReceiverContext
from fl_ray.receivers.tensorboard import TensorBoardReceiver
from fl_ray.tracking.events import EventKind, TrackingEvent

T0 = 1_700_000_000_000  # ms


def _ctx(tmp_path: Path) -> ReceiverContext:
    return ReceiverContext(job_id="job-1", job_name="tb-test", job_dir=tmp_path / "job", workspace=tmp_path,
                           sites=("site-1", "site-2"), config={})


def _ev(site: str, seq: int, kind: EventKind, key: str, value, step=None, group=None) -> TrackingEvent:
    return TrackingEvent(site, seq, kind, key, value, step, T0 + seq * 1000, group)


def _load(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall time) of each point; test values are exact in float32, as TensorBoard stores them."""
    return [(s.step, s.value, s.wall_time) for s in acc.Scalars(tag)]


def _texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(t.step, tensor_util.make_ndarray(t.tensor_proto).item().decode()) for t in acc.Tensors(tag)]


M, P, G, X = EventKind.METRIC, EventKind.PARAM, EventKind.TAG, EventKind.TEXT


def test_scalars_per_site_with_step_and_walltime(tmp_path):
    """Every metric lands in its site's run at its step, value and wall time, lower steps included."""
    rx = TensorBoardReceiver()
    rx.open(_ctx(tmp_path))
    rx.write([_ev("site-1", 0, M, "loss", 0.875, 0), _ev("site-2", 0, M, "loss", 0.625, 0),
              _ev("site-1", 1, M, "loss", 0.5, 5)])
    rx.write([_ev("site-1", 2, M, "loss", 0.75, 3), _ev("site-2", 1, M, "val/acc", 0.25, 1)])
    summary = rx.close(FINISHED)

    base = tmp_path / "job" / "tb_events"
    assert summary == {"log_dir": str(base), "sites": ["site-1", "site-2"], "scalars": 5, "texts": 0}
    s1, s2 = _load(base / "site-1"), _load(base / "site-2")
    assert _scalars(s1, "loss") == [(0, 0.875, 1_700_000_000.0), (5, 0.5, 1_700_000_001.0), (3, 0.75, 1_700_000_002.0)]
    assert _scalars(s2, "loss") == [(0, 0.625, 1_700_000_000.0)]
    assert _scalars(s2, "val/acc") == [(1, 0.25, 1_700_000_001.0)]
    assert s1.Tags()["scalars"] == ["loss"]


def test_add_scalars_layout(tmp_path):
    """add_scalars series go where torch puts them: sub-run <site>/<main_tag, '/' as '_'>_<series>, tag main_tag."""
    rx = TensorBoardReceiver(log_dir=str(tmp_path / "tb"))
    rx.open(_ctx(tmp_path))
    rx.write([_ev("site-1", 0, M, "loss/train", 1.0, 2, group="loss"),
              _ev("site-1", 1, M, "loss/val", 2.0, 2, group="loss"),
              _ev("site-1", 2, M, "eval/acc/top1", 0.5, 4, group="eval/acc")])
    rx.close(FINISHED)

    site = tmp_path / "tb" / "site-1"
    assert sorted(p.name for p in site.iterdir() if p.is_dir()) == ["eval_acc_top1", "loss_train", "loss_val"]
    assert _scalars(_load(site / "loss_train"), "loss") == [(2, 1.0, 1_700_000_000.0)]
    assert _scalars(_load(site / "loss_val"), "loss") == [(2, 2.0, 1_700_000_001.0)]
    assert _scalars(_load(site / "eval_acc_top1"), "eval/acc") == [(4, 0.5, 1_700_000_002.0)]
    assert _load(site).Tags()["scalars"] == []


def test_texts_params_and_tags(tmp_path):
    """Texts keep their tag and step (0 when none); params and tags become markdown tables per flush."""
    rx = TensorBoardReceiver()
    rx.open(_ctx(tmp_path))
    rx.write([_ev("site-1", 0, X, "report", "round one", 1), _ev("site-1", 1, X, "model/summary.txt", "a|b"),
              _ev("site-1", 2, P, "lr", "0.01"), _ev("site-1", 3, G, "phase", "train")])
    rx.flush()
    rx.write([_ev("site-1", 4, P, "batch|size", "32"), _ev("site-1", 5, G, "phase", "eval")])
    rx.close(FINISHED)

    acc = _load(tmp_path / "job" / "tb_events" / "site-1")
    assert _texts(acc, "report") == [(1, "round one")]
    assert _texts(acc, "model/summary.txt") == [(0, "a|b")]
    header = "| name | value |\n| --- | --- |\n"
    assert _texts(acc, "params") == [(0, header + "| lr | 0.01 |"),
                                     (1, header + "| batch\\|size | 32 |\n| lr | 0.01 |")]
    assert _texts(acc, "tags") == [(0, header + "| phase | train |"), (1, header + "| phase | eval |")]


def test_flush_leaves_files_readable_before_close(tmp_path):
    """After flush() returns, everything written so far can be read from disk while writers stay open."""
    rx = TensorBoardReceiver(flush_secs=300)
    rx.open(_ctx(tmp_path))
    rx.write([_ev("site-2", i, M, "loss", float(i), i) for i in range(50)])
    rx.flush()
    acc = _load(tmp_path / "job" / "tb_events" / "site-2")
    assert [s.step for s in acc.Scalars("loss")] == list(range(50))
    rx.write([_ev("site-2", 50, M, "loss", 50.0, 50)])
    rx.close(FINISHED)
    assert len(_load(tmp_path / "job" / "tb_events" / "site-2").Scalars("loss")) == 51


def test_lifecycle_and_bad_input(tmp_path):
    """write before open or after close, a bad flush_secs and a site that is no directory name are refused."""
    with pytest.raises(ValueError, match="flush_secs"):
        TensorBoardReceiver(flush_secs=0)
    rx = TensorBoardReceiver()
    with pytest.raises(RuntimeError, match="open"):
        rx.write([])
    rx.open(_ctx(tmp_path))
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        rx.write([_ev("../x", 0, M, "loss", 1.0, 0)])
    assert rx.close(FINISHED)["sites"] == []
    assert rx.close(FINISHED)["scalars"] == 0  # close twice is safe
    with pytest.raises(RuntimeError, match="closed"):
        rx.write([])
