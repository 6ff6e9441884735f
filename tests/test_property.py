"""Bad input, tried at scale (hypothesis): random keys, values, steps and types thrown at the writers,
and random configs at the config loader.

Writers: every call either records back-end-legal events or raises TypeError/ValueError and records
nothing; MLflow's own validators are the oracle for names. A long mixed stream of good and bad calls
goes through a real EventSender into a real receiver actor, which never crashes and delivers every
accepted record exactly once, to memory and to MLflow. Config: parse_config returns a JobConfig or
raises ConfigError, never anything else.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from typing import Any

import numpy as np
import ray
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import (
    _validate_metric,
    _validate_param_name,
    _validate_tag_name,
    path_not_unique,
    validate_param_and_metric_name,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fl_ray.actors.receiver import start_receiver
from fl_ray.config import ConfigError, JobConfig, apply_overrides, parse_config
from fl_ray.receivers.base import ReceiverContext
from fl_ray.tracking.events import MAX_INT64, EventKind, TrackingEvent
from fl_ray.tracking.sender import EventSender
from fl_ray.tracking.state import SiteState
from fl_ray.tracking.writers import MLflowWriter, SummaryWriter, WandBWriter

from conftest import REPO


def examples(n: int, **kwargs: Any) -> settings:
    """``n`` examples, no deadline (the machine is shared), no complaints about slow or large data."""
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        **kwargs,
    )


# -- what the writers are fed ----------------------------------------------------------------------


class BadStr:
    """A value whose ``str()`` fails, as a careless user object's might."""

    def __str__(self) -> str:
        raise RuntimeError("no string for you")


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)  # surrogates included
segment = st.from_regex(r"[A-Za-z0-9_\- :][A-Za-z0-9_\-. :]{0,12}", fullmatch=True)
good_keys = st.lists(segment, min_size=1, max_size=3).map("/".join).filter(lambda k: len(k) <= 250)
near_keys = st.from_regex(r"[A-Za-z0-9_\-. :/\n]{0,16}", fullmatch=True)  # "a//b", "./x", "x/", "..", "a\n"
keys = st.one_of(
    good_keys,
    near_keys,
    any_text,
    st.text(alphabet="ab/", min_size=245, max_size=260),
    st.integers(),
    st.none(),
    st.binary(max_size=5),
    st.floats(),
)
big_ints = st.integers(min_value=-(10**400), max_value=10**400)
numbers_ = st.one_of(
    st.floats(),
    st.integers(-(2**70), 2**70),
    big_ints,
    st.fractions(),
    st.decimals(),
    st.complex_numbers(),
    st.floats(width=32).map(np.float32),
    st.integers(-(2**31), 2**31).map(np.int64),
)
values = st.one_of(
    numbers_,
    st.booleans(),
    st.none(),
    any_text,
    st.lists(st.floats(), max_size=2),
    st.floats().map(lambda x: np.array([x])),
    st.floats().map(np.array),
    st.dictionaries(st.text(max_size=3), st.floats(), max_size=2),
)
steps = st.one_of(
    st.none(),
    st.integers(-3, 2**64),
    st.just(MAX_INT64),
    st.just(MAX_INT64 + 1),
    st.floats(),
    st.booleans(),
    st.integers(0, 2**62).map(np.int64),
    any_text,
)
timestamps = st.one_of(st.none(), st.integers(-3, 2**64), st.floats(), st.booleans(), any_text)
text_values = st.one_of(
    values,
    any_text,
    st.text(alphabet="x", min_size=5990, max_size=8010),
    st.just(BadStr()),
    st.tuples(st.integers()),
    st.sets(st.integers(), max_size=2),
    st.binary(max_size=4),
)
mappings = st.one_of(
    st.dictionaries(keys.filter(lambda k: isinstance(k, (str, int, float))), values, max_size=4), values
)
nested = st.recursive(
    values,
    lambda inner: st.dictionaries(st.one_of(good_keys, any_text, st.integers()), inner, max_size=3),
    max_leaves=6,
)

calls = st.one_of(
    st.tuples(st.just("log_metric"), keys, values, steps, timestamps),
    st.tuples(st.just("log_metric"), good_keys, st.floats(), st.none() | st.integers(0, 2**40), st.none()),
    st.tuples(st.just("log_metrics"), mappings, steps, timestamps),
    st.tuples(st.just("log_param"), keys, text_values),
    st.tuples(
        st.just("log_params"),
        st.one_of(st.dictionaries(keys.filter(lambda k: isinstance(k, str)), text_values, max_size=3), values),
    ),
    st.tuples(st.just("set_tag"), keys, text_values),
    st.tuples(st.just("set_tags"), st.one_of(st.dictionaries(good_keys, text_values, max_size=3), values)),
    st.tuples(st.just("log_text"), st.one_of(any_text, values), keys),
    st.tuples(st.just("add_scalar"), keys, values, steps, st.one_of(st.none(), st.floats(), big_ints)),
    st.tuples(st.just("add_scalars"), keys, mappings, steps, st.none()),
    st.tuples(st.just("add_text"), keys, st.one_of(any_text, values), steps),
    st.tuples(st.just("wandb_log"), nested, steps, st.sampled_from([None, True, False])),
    st.tuples(st.just("wandb_config"), nested),
)

good_values = st.one_of(st.floats(), st.integers(-(2**53), 2**53))
good_steps = st.none() | st.integers(0, 2**40)
good_calls = st.one_of(
    st.tuples(st.just("log_metric"), good_keys, good_values, good_steps, st.none() | st.integers(0, 2**45)),
    st.tuples(
        st.just("log_metrics"), st.dictionaries(good_keys, good_values, min_size=1, max_size=5), good_steps, st.none()
    ),
    st.tuples(st.just("log_params"), st.dictionaries(good_keys, st.text(max_size=20), min_size=1, max_size=3)),
    st.tuples(st.just("set_tags"), st.dictionaries(good_keys, st.text(max_size=20), min_size=1, max_size=3)),
    st.tuples(
        st.just("add_scalars"),
        good_keys,
        st.dictionaries(segment, good_values, min_size=1, max_size=3),
        good_steps,
        st.none() | st.floats(0, 2e9),
    ),
    st.tuples(
        st.just("wandb_log"),
        st.dictionaries(good_keys, good_values, min_size=1, max_size=4),
        good_steps,
        st.sampled_from([None, True, False]),
    ),
)
mixed_calls = st.one_of(good_calls, calls)


def invoke(writers: tuple[MLflowWriter, SummaryWriter, WandBWriter], call: tuple) -> None:
    mlflow, tensorboard, wandb = writers
    name, *args = call
    if name == "wandb_log":
        wandb.log(args[0], step=args[1], commit=args[2])
    elif name == "wandb_config":
        wandb.config.update(args[0])
    elif name in ("add_scalar", "add_scalars", "add_text"):
        getattr(tensorboard, name)(*args)
    else:
        getattr(mlflow, name)(*args)


class RecordingSender(EventSender):
    """An EventSender that also keeps a copy of every event it accepted, for the test to compare."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.log: list[TrackingEvent] = []
        super().__init__(*args, **kwargs)

    def record(self, kind, key, value, step, timestamp, group=None) -> None:
        seq = self.state.seq
        super().record(kind, key, value, step, timestamp, group)
        self.log.append(TrackingEvent(self.site, seq, kind, key, value, step, timestamp, group))


class _NoReceiver:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("a buffer-only sender must not send")


def buffer_only_sender() -> RecordingSender:
    return RecordingSender("site-1", _NoReceiver(), batch_size=10**9, flush_interval=3600)


def discard(sender: EventSender) -> None:
    """Stop a buffer-only sender's thread without sending what it holds."""
    with sender._cond:
        sender._closed = True
        sender._cond.notify_all()


def apply(writers, sender: RecordingSender, call: tuple) -> bool:
    """Make the call; True if it was accepted. A refused call must raise TypeError/ValueError and record nothing."""
    before = len(sender.log)
    try:
        invoke(writers, call)
    except (TypeError, ValueError):
        assert len(sender.log) == before, f"{call!r:.300} raised but recorded {len(sender.log) - before} event(s)"
        return False
    return True


def assert_backend_legal(e: TrackingEvent) -> None:
    """What every back end accepts: MLflow's own validators, 64-bit steps and timestamps, UTF-8 text."""
    assert type(e.key) is str and 0 <= e.timestamp <= MAX_INT64 and type(e.timestamp) is int
    if e.kind is EventKind.METRIC:
        assert type(e.value) is float and type(e.step) is int and 0 <= e.step <= MAX_INT64
        _validate_metric(e.key, e.value, e.timestamp, e.step)
    else:
        assert type(e.value) is str
        e.value.encode("utf-8")
        if e.kind is EventKind.PARAM:
            _validate_param_name(e.key)
            assert len(e.value) <= 6000
        elif e.kind is EventKind.TAG:
            _validate_tag_name(e.key)
            assert len(e.value) <= 8000
        else:
            _validate_param_name(e.key)  # an artifact path: the same rules keep it a plain relative path
    assert "\n" not in e.key


# -- writers, without Ray --------------------------------------------------------------------------


@examples(400)
@given(st.lists(mixed_calls, min_size=1, max_size=12))
def test_writers_raise_the_documented_errors_and_record_only_legal_events(batch):
    """Any call sequence: TypeError/ValueError (nothing recorded) or back-end-legal events, never a crash."""
    sender = buffer_only_sender()
    writers = (MLflowWriter(sender), SummaryWriter(sender), WandBWriter(sender))
    try:
        for call in batch:
            apply(writers, sender, call)
        for e in sender.log:
            assert_backend_legal(e)
        assert [e.seq for e in sender.log] == list(range(len(sender.log)))
    finally:
        discard(sender)


def mlflow_accepts_name(key: str) -> bool:
    return bool(key) and len(key) <= 250 and bool(validate_param_and_metric_name(key)) and not path_not_unique(key)


@examples(500)
@given(st.one_of(good_keys, near_keys, any_text, st.text(alphabet="ab/.", min_size=0, max_size=260)))
def test_a_name_is_refused_exactly_when_mlflow_would_refuse_it(key):
    """MLflow's validators are the oracle: the writers accept a name iff MLflow does (a trailing newline,
    which MLflow's regex lets through by accident, is refused too)."""
    sender = buffer_only_sender()
    writers = (MLflowWriter(sender), SummaryWriter(sender), WandBWriter(sender))
    try:
        ok = mlflow_accepts_name(key) and "\n" not in key
        for call in (("log_metric", key, 1.0, 0, None), ("log_param", key, "v"), ("set_tag", key, "v")):
            assert apply(writers, sender, call) is ok, (call, ok)
    finally:
        discard(sender)


def metric_value_ok(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (complex, np.complexfloating, str)):
        return False
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and metric_value_ok(value.item())
    if isinstance(value, (int, float, Fraction, np.integer, np.floating)):
        try:
            float(value)
        except OverflowError:
            return False
        return True
    return False  # Decimal, None, lists, dicts, ...


def step_ok(step: Any) -> bool:
    return step is None or (
        isinstance(step, (int, np.integer)) and not isinstance(step, bool) and 0 <= int(step) <= MAX_INT64
    )


@examples(500)
@given(st.one_of(values, st.floats(), st.integers(0, 2**40)), steps)
def test_a_metric_is_refused_exactly_when_its_value_or_step_is_bad(value, step):
    """Real numbers (NaN and infinities too) at steps 0..2**63-1 are accepted; anything else raises
    TypeError/ValueError, whichever writer syntax is used."""
    expected = metric_value_ok(value) and step_ok(step)
    wandb = [] if isinstance(value, dict) else [("wandb_log", {"m": value}, step, None)]  # W&B nests dicts
    for call in [("log_metric", "m", value, step, None), ("add_scalar", "m", value, step, None), *wandb]:
        sender = buffer_only_sender()
        writers = (MLflowWriter(sender), SummaryWriter(sender), WandBWriter(sender))
        try:
            assert apply(writers, sender, call) is expected, call
            if expected:
                (e,) = sender.log
                assert e.value == float(value) or (math.isnan(e.value) and math.isnan(float(value)))
        finally:
            discard(sender)


# -- writers -> EventSender -> receiver actor -> memory and MLflow ------------------------------------


def comparable(e) -> tuple:
    """An event as a tuple that compares equal after a round trip (NaN != NaN otherwise)."""
    e = TrackingEvent(*e)
    value = "nan" if isinstance(e.value, float) and math.isnan(e.value) else e.value
    return (e.site, e.seq, EventKind(e.kind), e.key, value, e.step, e.timestamp, e.group)


def stored(value: float) -> Any:
    """A metric value as MLflow's sqlite store gives it back (NaN; infinities as the largest float)."""
    if math.isnan(value):
        return "nan"
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def test_a_mixed_stream_reaches_the_receiver_actor_exactly_once(ray_session, tmp_path):
    """Hundreds of random writer calls, good and bad, through a real EventSender into a real receiver
    actor (memory + MLflow): the actor never crashes, every accepted record arrives exactly once,
    and MLflow holds every metric point, param and tag."""
    ctx = ReceiverContext(
        job_id=f"property-{os.getpid()}",
        job_name="property",
        job_dir=tmp_path,
        workspace=tmp_path,
        sites=("site-1",),
        config={},
    )
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = start_receiver(
        ctx, [{"type": "user_receivers:EchoReceiver"}, {"type": "mlflow", "buffer_flush_time": 0}], {}, here
    )
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    state = SiteState.from_snapshot("site-1", ray.get(actor.open_site.remote("site-1")))
    sender = RecordingSender(state, actor, batch_size=37, flush_interval=0.05)
    writers = (MLflowWriter(sender), SummaryWriter(sender), WandBWriter(sender))
    tried = []

    @examples(200, database=None)
    @given(st.lists(mixed_calls, min_size=1, max_size=12))
    def feed(batch):
        for call in batch:
            tried.append(apply(writers, sender, call))

    feed()
    assert sender.close(timeout=120) == 0
    assert ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) == pid, "the receiver actor restarted"
    report = ray.get(actor.close.remote("FINISHED", 120))
    ray.kill(actor, no_restart=True)

    accepted = sender.log
    assert 0 < sum(tried) < len(tried), "the stream should hold good and bad calls"
    assert accepted and report["accepted"] == len(accepted) and report["duplicates_dropped"] == 0
    echo = report["receivers"]["user_receivers_EchoReceiver"]["echo"]
    assert sorted(map(comparable, echo), key=repr) == sorted(map(comparable, accepted), key=repr)

    mlflow = report["receivers"]["mlflow"]
    assert mlflow["undelivered"] == 0 and "error" not in mlflow
    # only a text whose artifact path clashes with another's ("a" and "a/b.txt") may be set aside as refused
    letters = (
        [json.loads(line) for line in (tmp_path / "dead_letters.jsonl").read_text().splitlines()]
        if mlflow.get("dead_letters")
        else []
    )
    assert len(letters) == mlflow.get("dead_letters", 0) and all(d["kind"] == "text" for d in letters), letters
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow["tracking_uri"])
    run = client.get_run(mlflow["run_ids"]["site-1"])
    metrics: dict[str, set] = {}
    for e in accepted:
        if e.kind is EventKind.METRIC:
            metrics.setdefault(e.key, set()).add((e.step, stored(e.value), e.timestamp))
    for key, points in metrics.items():
        got = [(m.step, stored(m.value), m.timestamp) for m in client.get_metric_history(run.info.run_id, key)]
        assert len(got) == len(set(got)) and set(got) == points, key
    params = {e.key: e.value for e in accepted if e.kind is EventKind.PARAM}
    tags = {e.key: e.value for e in accepted if e.kind is EventKind.TAG}
    assert run.data.params == params
    assert {k: v for k, v in run.data.tags.items() if k in tags} == tags


# -- config ----------------------------------------------------------------------------------------

DEFAULT = JobConfig().to_dict()


def paths(data: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in data.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(paths(v, (*prefix, k)))
    return out


FIELD_PATHS = paths(DEFAULT) + [
    ("tracking", "receivers", 0, "type"),
    ("tracking", "receivers", 0, "tracking_uri"),
    ("tracking", "credentials", "MLFLOW_TRACKING_TOKEN"),
    ("learner_args", "x"),
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from([2**63, -(2**63), 10**30]),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 0.5, 1.5, 1e308]),
    st.text(max_size=20),
    any_text,
    st.sampled_from(["mlflow", "a:b", ":", "site-1", "1e400", "inf"]),
)
config_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)
    ),
    max_leaves=8,
)


def too_many_sites(data: Any) -> bool:
    """A site count the loader would turn into millions of names (see test_a_huge_site_count_...)."""
    sites = data.get("sites") if isinstance(data, dict) else None
    try:
        return not isinstance(sites, (list, dict)) and sites is not None and float(sites) > 10_000
    except (TypeError, ValueError, OverflowError):
        return False


def check_parse(data: Any) -> None:
    assume(not too_many_sites(data))
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid job config"), str(exc)
        return
    assert isinstance(cfg, JobConfig)


@examples(400)
@given(st.dictionaries(st.one_of(st.sampled_from(sorted(DEFAULT)), st.text(max_size=10)), config_values, max_size=6))
def test_random_configs_raise_only_config_errors(data):
    """Random data: parse_config returns a JobConfig or raises ConfigError, nothing else."""
    check_parse(data)


def set_path(data: dict, path: tuple, value: Any) -> dict:
    """Set ``path`` (keys, and 0 for the first receiver entry) to ``value``, creating sections on the way."""
    node: Any = data
    for part, following in zip(path, path[1:]):
        if isinstance(part, int):
            node = node[part]
        elif isinstance(following, int):
            if not (isinstance(node.get(part), list) and node[part] and isinstance(node[part][0], dict)):
                node[part] = [{"type": "mlflow"}]
            node = node[part]
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
    node[path[-1]] = value
    return data


@examples(1000)
@given(st.lists(st.tuples(st.sampled_from(FIELD_PATHS), st.one_of(scalars, config_values)), min_size=1, max_size=3))
def test_valid_configs_with_random_fields_raise_only_config_errors(changes):
    """The default config with one to three fields set to random values: a JobConfig or a ConfigError."""
    import copy

    data = copy.deepcopy(DEFAULT)
    for path, value in changes:
        data = set_path(data, path, value)
    check_parse(data)


NASTY = [
    None,
    True,
    0,
    -1,
    1.5,
    2**63,
    10**30,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "x",
    "inf",
    [],
    [None],
    {},
    {"a": 1},
    "a:b",
    "\ud800",
]


def test_every_field_with_every_nasty_value_raises_only_config_errors():
    """Each field of the default config set, in turn, to each of a list of nasty values: a JobConfig or a
    ConfigError, never another exception (deterministic, so no case is left to chance)."""
    import copy

    crashes = []
    for path in FIELD_PATHS:
        for value in NASTY:
            data = set_path(copy.deepcopy(DEFAULT), path, value)
            if too_many_sites(data):
                continue
            try:
                parse_config(data)
            except ConfigError:
                pass
            except Exception as exc:  # noqa: BLE001 - collected, so every crash is reported at once
                crashes.append(f"{'.'.join(map(str, path))} = {value!r}: {type(exc).__name__}: {exc}")
    assert not crashes, "parse_config crashed instead of raising ConfigError:\n" + "\n".join(crashes)


@examples(300)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from([".".join(map(str, p)) for p in FIELD_PATHS if not any(isinstance(x, int) for x in p)]),
                st.text(max_size=20),
            ).map("=".join),
            st.text(max_size=30),
        ),
        max_size=3,
    )
)
def test_random_overrides_raise_only_config_errors(overrides):
    """--set KEY=VALUE with random keys and YAML values: a JobConfig or a ConfigError."""
    try:
        data = apply_overrides(DEFAULT, overrides)
    except ConfigError:
        return
    check_parse(data)


def test_a_huge_site_count_is_a_config_error():
    """sites: 10**12 must be refused by the loader, not turned into 10**12 site names (memory-capped
    subprocess, so a regression cannot take the machine down)."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from fl_ray.config import ConfigError, parse_config\n"
        "try:\n    parse_config({'sites': 10**12})\nexcept ConfigError as exc:\n    print('ConfigError', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stdout.startswith("ConfigError"), done.stdout + done.stderr[-500:]
