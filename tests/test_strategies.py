"""Built-in strategies against their published update rules, written out here independently; registry errors."""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from fl_ray.strategies import STRATEGIES, FitResult, Strategy, StrategyError, build_strategy
from fl_ray.strategies.fedadagrad import adagrad_second_moment
from fl_ray.strategies.fedadam import adam_second_moment
from fl_ray.strategies.fedavgm import server_momentum_step
from fl_ray.strategies.fedmedian import coordinate_median
from fl_ray.strategies.fedtrimmedavg import trimmed_mean
from fl_ray.strategies.fedyogi import yogi_second_moment
from fl_ray.strategies.scaffold import gradient_correction, initial_control, site_control_update

SITES = ["site-1", "site-2", "site-3", "site-4"]
SAMPLES = {"site-1": 10, "site-2": 30, "site-3": 5, "site-4": 55}
SCALES = (1.0, 0.01, 0.3)  # how far the sites move each round: varied so Yogi's sign takes both values
ROUND_SITES = (["site-1", "site-2", "site-3"], ["site-2", "site-4"], ["site-1", "site-3", "site-4"])
K_STEPS, LOCAL_LR = 4, 0.05

SPECS = {
    "fedavg": {"name": "fedavg"},
    "fedavgm": {"name": "fedavgm", "server_lr": 0.7, "momentum": 0.9},
    "fedprox": {"name": "fedprox", "mu": 0.05},
    "fedadam": {"name": "fedadam", "eta": 0.05, "eta_l": 0.02, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01},
    "fedyogi": {"name": "fedyogi", "eta": 0.05, "eta_l": 0.02, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01},
    "fedadagrad": {"name": "fedadagrad", "eta": 0.05, "beta_1": 0.8, "tau": 0.01},
    "scaffold": {"name": "scaffold", "eta_g": 0.8},
    "fedmedian": {"name": "fedmedian"},
    "fedtrimmedavg": {"name": "fedtrimmedavg", "beta": 0.25},
}


def _initial(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 2)).astype(dtype), "b": rng.normal(size=2).astype(dtype)}


def _site_weights(weights, round_, site):
    rng = np.random.default_rng(100 * round_ + SITES.index(site))
    return {k: (v + rng.normal(scale=SCALES[round_ - 1], size=v.shape)).astype(v.dtype) for k, v in weights.items()}


def _scaffold_extras(site_controls, control, weights, local, site):
    """The site side of SCAFFOLD option II, written out: c_i+ = c_i - c + (x - y_i) / (K * lr)."""
    old = site_controls.get(site, {k: np.zeros_like(v) for k, v in control.items()})
    new = {k: old[k] - control[k] + (weights[k] - local[k]) / (K_STEPS * LOCAL_LR) for k in control}
    site_controls[site] = new
    return {"control_delta": {k: new[k] - old[k] for k in control}}


def _run_round(strategy, round_, weights, sites, site_controls=None):
    """Configure and aggregate one round of ``strategy`` on ``sites`` (SCAFFOLD sites keep ``site_controls``)."""
    plan = strategy.configure_round(round_, weights, SITES, len(sites), np.random.default_rng(round_))
    aggregation = strategy.aggregation(round_, weights)
    for site in sites:
        local = _site_weights(weights, round_, site)
        extras = {}
        if site_controls is not None:
            extras = _scaffold_extras(site_controls, plan.payload["control"], weights, local, site)
        aggregation.add(FitResult(site, local, SAMPLES[site], {"loss": 1.0}, extras))
    new, metrics = aggregation.result()
    return new, metrics, plan


def _run(spec, rounds=3, weights=None, site_controls=None):
    """Build ``spec`` and run ``rounds`` rounds: the strategy and each round's (weights, metrics, plan)."""
    strategy = build_strategy(spec)
    weights = weights or _initial()
    strategy.initialize(weights, SITES)
    if spec["name"] == "scaffold" and site_controls is None:
        site_controls = {}
    history = []
    for round_ in range(1, rounds + 1):
        weights, metrics, plan = _run_round(strategy, round_, weights, ROUND_SITES[round_ - 1], site_controls)
        history.append((weights, metrics, plan))
    return strategy, history


def _weighted_average(weights, round_, sites):
    stacked = {k: np.stack([_site_weights(weights, round_, s)[k] for s in sites]) for k in weights}
    return {k: np.average(v, axis=0, weights=[SAMPLES[s] for s in sites]) for k, v in stacked.items()}


def _assert_weights(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-12, atol=1e-12)


def test_fedavg_is_the_sample_weighted_average():
    """Three rounds with unequal sample counts: each new model is np.average of the results, weighted."""
    _, history = _run(SPECS["fedavg"])

    weights = _initial()
    for round_, (actual, metrics, _) in enumerate(history, 1):
        expected = _weighted_average(weights, round_, ROUND_SITES[round_ - 1])
        _assert_weights(actual, expected)
        assert metrics["update_norm"] == pytest.approx(
            math.sqrt(sum(np.sum((expected[k] - weights[k]) ** 2) for k in weights))
        )
        weights = expected


def test_fedavgm_applies_server_momentum():
    """Hsu et al. 2019: d = w - avg; m = momentum * m + d; w = w - server_lr * m, over three rounds."""
    _, history = _run(SPECS["fedavgm"])

    weights = _initial()
    m = {k: np.zeros_like(v) for k, v in weights.items()}
    for round_, (actual, metrics, _) in enumerate(history, 1):
        avg = _weighted_average(weights, round_, ROUND_SITES[round_ - 1])
        pseudo_gradient = {k: weights[k] - avg[k] for k in weights}
        m = {k: 0.9 * m[k] + pseudo_gradient[k] for k in weights}
        weights = {k: weights[k] - 0.7 * m[k] for k in weights}
        _assert_weights(actual, weights)
        assert metrics["server_lr"] == 0.7
        assert metrics["pseudo_gradient_norm"] == pytest.approx(
            math.sqrt(sum(np.sum(d**2) for d in pseudo_gradient.values()))
        )
        assert metrics["momentum_norm"] == pytest.approx(math.sqrt(sum(np.sum(v**2) for v in m.values())))


def test_fedprox_sends_mu_to_every_sampled_site_and_averages():
    """Li et al. 2020: each sampled site's round config is {'mu': mu}; aggregation is FedAvg's."""
    _, history = _run(SPECS["fedprox"])
    _, fedavg = _run(SPECS["fedavg"])

    for (actual, _, plan), (expected, _, _) in zip(history, fedavg):
        assert plan.config == {site: {"mu": 0.05} for site in plan.sites} and plan.sites
        _assert_weights(actual, expected)


SECOND_MOMENTS = {
    "fedadagrad": lambda v, d: v + d * d,
    "fedadam": lambda v, d: 0.95 * v + (1 - 0.95) * d * d,
    "fedyogi": lambda v, d: v - (1 - 0.95) * d * d * np.sign(v - d * d),
}


@pytest.mark.parametrize("name", sorted(SECOND_MOMENTS))
def test_fedopt_follows_reddi_et_al(name):
    """Reddi et al. 2021, Algorithm 2: delta = avg - x; m, v from zero and tau^2; x += eta * m / (sqrt(v) + tau)."""
    _, history = _run(SPECS[name])

    eta, beta_1, tau = 0.05, 0.8, 0.01
    weights = _initial()
    m = {k: np.zeros_like(v) for k, v in weights.items()}
    v = {k: np.full_like(w, tau**2) for k, w in weights.items()}
    signs = set()
    for round_, (actual, metrics, _) in enumerate(history, 1):
        avg = _weighted_average(weights, round_, ROUND_SITES[round_ - 1])
        delta = {k: avg[k] - weights[k] for k in weights}
        signs |= {float(s) for k in weights for s in np.sign(v[k] - delta[k] ** 2).ravel()}
        m = {k: beta_1 * m[k] + (1 - beta_1) * delta[k] for k in weights}
        v = {k: SECOND_MOMENTS[name](v[k], delta[k]) for k in weights}
        weights = {k: weights[k] + eta * m[k] / (np.sqrt(v[k]) + tau) for k in weights}
        _assert_weights(actual, weights)
        assert metrics["server_lr"] == eta
        assert metrics["pseudo_gradient_norm"] == pytest.approx(math.sqrt(sum(np.sum(d**2) for d in delta.values())))
    assert {-1.0, 1.0} <= signs  # Yogi's update went both ways over these rounds


def test_fedopt_sends_eta_l_as_the_local_lr_only_when_set():
    """eta_l reaches each sampled site as {'lr': eta_l}; without it sites get no config."""
    _, with_eta_l = _run(SPECS["fedadam"], rounds=1)
    _, without = _run({"name": "fedadam"}, rounds=1)

    plan = with_eta_l[0][2]
    assert plan.config == {site: {"lr": 0.02} for site in plan.sites}
    assert without[0][2].config == {}


def test_fedopt_second_moment_functions_match_hand_computed_values():
    """v=0.5, delta=2 (delta^2=4), beta_2=0.9: Adagrad 4.5, Adam 0.85, Yogi 0.5 + 0.1 * 4 = 0.9."""
    v, delta = np.array([0.5]), np.array([2.0])
    assert adagrad_second_moment(v, delta) == pytest.approx(4.5)
    assert adam_second_moment(v, delta, 0.9) == pytest.approx(0.85)
    assert yogi_second_moment(v, delta, 0.9) == pytest.approx(0.9)
    assert yogi_second_moment(np.array([5.0]), delta, 0.9) == pytest.approx(5.0 - 0.4)


def test_server_momentum_step_matches_hand_computed_values():
    """w=1, avg=0.5, m=0.2, momentum=0.5, server_lr=2: m = 0.1 + 0.5 = 0.6; w = 1 - 1.2 = -0.2."""
    w, m = server_momentum_step(np.array([1.0]), np.array([0.5]), np.array([0.2]), 2.0, 0.5)
    assert m == pytest.approx(0.6) and w == pytest.approx(-0.2)


def test_scaffold_follows_option_two():
    """Karimireddy et al. 2020: x += eta_g * mean(y_i - x); c += |S|/N * mean(delta c_i); c goes out as 'control'."""
    _, history = _run(SPECS["scaffold"])

    weights = _initial()
    control = {k: np.zeros_like(v) for k, v in weights.items()}
    site_controls = {}
    for round_, (actual, metrics, plan) in enumerate(history, 1):
        for key in weights:
            np.testing.assert_allclose(plan.payload["control"][key], control[key], rtol=1e-12, atol=1e-15)
        sites = ROUND_SITES[round_ - 1]
        locals_ = {s: _site_weights(weights, round_, s) for s in sites}
        deltas = [_scaffold_extras(site_controls, control, weights, locals_[s], s)["control_delta"] for s in sites]
        control = {k: control[k] + len(sites) / len(SITES) * np.mean([d[k] for d in deltas], axis=0) for k in weights}
        weights = {k: weights[k] + 0.8 * np.mean([locals_[s][k] - weights[k] for s in sites], axis=0) for k in weights}
        _assert_weights(actual, weights)
        assert metrics["server_lr"] == 0.8
        assert metrics["control_norm"] == pytest.approx(math.sqrt(sum(np.sum(c**2) for c in control.values())))


def test_scaffold_site_functions_match_the_paper():
    """The learner's helpers: correction c - c_i; c_i+ = c_i - c + (x - y) / (K * lr) and its delta."""
    x = _initial()
    y = _site_weights(x, 1, "site-1")
    c = {k: np.full_like(v, 0.3) for k, v in x.items()}
    c_i = {k: np.full_like(v, -0.1) for k, v in x.items()}

    correction = gradient_correction(c, c_i)
    new, delta = site_control_update(c_i, c, x, y, K_STEPS, LOCAL_LR)

    for k in x:
        np.testing.assert_allclose(correction[k], 0.4)
        np.testing.assert_allclose(new[k], -0.1 - 0.3 + (x[k] - y[k]) / (K_STEPS * LOCAL_LR))
        np.testing.assert_allclose(delta[k], new[k] - c_i[k])
    zeros = initial_control(x)
    assert set(zeros) == set(x) and all(not z.any() and z.shape == x[k].shape for k, z in zeros.items())
    with pytest.raises(ValueError, match="steps"):
        site_control_update(c_i, c, x, y, 0, LOCAL_LR)


def test_scaffold_refuses_a_result_without_a_matching_control_delta():
    """No extras['control_delta'], or one with another key, is refused naming what is wrong."""
    strategy = build_strategy({"name": "scaffold"})
    weights = _initial()
    strategy.initialize(weights, SITES)
    aggregation = strategy.aggregation(1, weights)

    with pytest.raises(StrategyError, match="control_delta"):
        aggregation.add(FitResult("site-1", weights, 3))
    with pytest.raises(StrategyError, match="missing \\['b'\\]"):
        aggregation.add(FitResult("site-1", weights, 3, extras={"control_delta": {"w": weights["w"]}}))
    assert aggregation.count == 0


def _outlier_results(weights, n=5):
    results = [FitResult(f"site-{i}", _site_weights(weights, 1, SITES[i % 4]), 1 + i) for i in range(n - 1)]
    return results + [FitResult("evil", {k: np.full_like(v, 1e6) for k, v in weights.items()}, 10_000)]


def test_fedmedian_is_the_coordinate_wise_median_and_ignores_an_outlier():
    """Five results, one at 1e6 with most samples: the new model is np.median of the five, near the others."""
    weights = _initial()
    results = _outlier_results(weights)
    aggregation = build_strategy({"name": "fedmedian"}).aggregation(1, weights)
    for result in results:
        aggregation.add(result)

    new, metrics = aggregation.result()

    for k in weights:
        np.testing.assert_allclose(new[k], np.median([r.weights[k] for r in results], axis=0))
        assert np.all(np.abs(new[k] - weights[k]) < 5)
    assert metrics["results_trimmed"] == 4


def test_fedtrimmedavg_drops_beta_at_each_end_and_ignores_an_outlier():
    """beta=0.25 of 5 results drops one at each end per coordinate, then takes the plain mean of the other three."""
    weights = _initial()
    results = _outlier_results(weights)
    aggregation = build_strategy(SPECS["fedtrimmedavg"]).aggregation(1, weights)
    for result in results:
        aggregation.add(result)

    new, metrics = aggregation.result()

    for k in weights:
        values = np.stack([r.weights[k] for r in results])
        expected = np.zeros_like(weights[k])
        for index in np.ndindex(weights[k].shape):
            column = sorted(values[(slice(None), *index)])
            expected[index] = sum(column[1:-1]) / 3
        np.testing.assert_allclose(new[k], expected, rtol=1e-12)
        assert np.all(np.abs(new[k] - weights[k]) < 5)
    assert metrics["results_trimmed"] == 2


@pytest.mark.parametrize("n, beta, trimmed", [(5, 0.1, 0), (10, 0.1, 2), (100, 0.29, 58), (3, 0.49, 2), (2, 0.49, 0)])
def test_trimmed_mean_trims_floor_of_beta_n_at_each_end(n, beta, trimmed):
    """floor(beta * n) per end (0.29 * 100 counts as 29), always leaving at least one value."""
    stacked = np.arange(n, dtype=np.float64)[::-1].reshape(n, 1)

    mean, count = trimmed_mean(stacked, beta)

    k = trimmed // 2
    assert count == trimmed
    assert mean == pytest.approx(np.mean(np.arange(n)[k : n - k]))


def test_coordinate_median_counts_what_it_leaves_out():
    """Odd n uses one middle value, even n two."""
    assert coordinate_median(np.arange(5.0).reshape(5, 1))[1] == 4
    assert coordinate_median(np.arange(4.0).reshape(4, 1)) == (pytest.approx(1.5), 2)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_integer_entries_stay_rounded_counters(name):
    """BatchNorm's num_batches_tracked stays int64: the rounded weighted mean (median / trimmed mean for the robust)."""
    strategy = build_strategy(SPECS[name])
    weights = {**_initial(), "num_batches_tracked": np.array(7, dtype=np.int64)}
    strategy.initialize(weights, SITES)
    aggregation = strategy.aggregation(1, weights)
    counters = {"site-1": 10, "site-2": 21, "site-3": 12, "site-4": 40}
    for site, count in counters.items():
        extras = {"control_delta": initial_control(weights)} if name == "scaffold" else {}
        aggregation.add(
            FitResult(
                site,
                {**_site_weights(_initial(), 1, site), "num_batches_tracked": np.array(count, dtype=np.int64)},
                SAMPLES[site],
                extras=extras,
            )
        )

    out = aggregation.result()[0]["num_batches_tracked"]

    values = list(counters.values())
    expected = {"fedmedian": np.median(values), "fedtrimmedavg": np.mean(sorted(values)[1:-1])}.get(
        name, np.average(values, weights=[SAMPLES[s] for s in counters])
    )
    assert out.dtype == np.int64 and out == np.rint(expected)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float32_weights_stay_float32(name):
    """A float32 model comes back float32, whatever the strategy computes in."""
    strategy, history = _run(SPECS[name], rounds=2, weights=_initial(np.float32))
    assert all(w.dtype == np.float32 for w in history[-1][0].values())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_state_round_trip_continues_exactly(name):
    """A strategy rebuilt from a pickled state() after two rounds gives the original's third round exactly."""
    site_controls = {} if name == "scaffold" else None  # SCAFFOLD's sites keep theirs, as the engine would
    original, history = _run(SPECS[name], rounds=2, site_controls=site_controls)
    rebuilt = build_strategy(SPECS[name])
    rebuilt.load_state(pickle.loads(pickle.dumps(original.state())))
    weights = history[-1][0]
    controls_copy = pickle.loads(pickle.dumps(site_controls))

    expected = _run_round(original, 3, weights, ROUND_SITES[2], site_controls)
    actual = _run_round(rebuilt, 3, weights, ROUND_SITES[2], controls_copy)

    for key in weights:
        np.testing.assert_array_equal(actual[0][key], expected[0][key])
    assert actual[1] == expected[1]
    assert actual[2].config == expected[2].config and actual[2].sites == expected[2].sites
    assert pickle.dumps(actual[2].payload) == pickle.dumps(expected[2].payload)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda w: {"w": w["w"]}, r"missing \['b'\]"),
        (lambda w: {**w, "extra": np.zeros(1)}, r"unexpected \['extra'\]"),
        (lambda w: {**w, "b": np.zeros(3)}, r"'b' has shape \(3,\), expected \(2,\)"),
        (lambda w: {**w, "w": np.full((3, 2), np.nan)}, "'w' holds NaN"),
    ],
)
def test_a_mismatched_result_is_refused_naming_the_key_and_changes_nothing(name, bad, message):
    """Keys, shapes or values that do not fit the global weights raise StrategyError; the aggregation goes on."""
    strategy = build_strategy(SPECS[name])
    weights = _initial()
    strategy.initialize(weights, SITES)
    aggregation = strategy.aggregation(1, weights)
    extras = {"control_delta": initial_control(weights)} if name == "scaffold" else {}
    good = [FitResult(s, _site_weights(weights, 1, s), SAMPLES[s], extras=extras) for s in SITES[:3]]
    aggregation.add(good[0])

    with pytest.raises(StrategyError, match=message):
        aggregation.add(FitResult("site-9", bad(weights), 5, extras=extras))
    for result in good[1:]:
        aggregation.add(result)

    reference = build_strategy(SPECS[name])
    reference.initialize(weights, SITES)
    clean = reference.aggregation(1, weights)
    for result in good:
        clean.add(result)
    assert aggregation.count == 3
    actual, expected = aggregation.result()[0], clean.result()[0]
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value)


@pytest.mark.parametrize("num_samples", [0, -3, True, 2.5])
def test_a_result_needs_a_positive_integer_sample_count(num_samples):
    """num_samples must be a positive int (not a bool, not a float)."""
    weights = _initial()
    with pytest.raises(StrategyError, match="num_samples"):
        build_strategy({"name": "fedavg"}).aggregation(1, weights).add(FitResult("site-1", weights, num_samples))


def test_describe_returns_the_name_and_every_argument():
    """describe() is what the parent run logs: the registered name and the arguments in force, defaults included."""
    assert build_strategy(SPECS["fedavgm"]).describe() == {"name": "fedavgm", "server_lr": 0.7, "momentum": 0.9}
    assert build_strategy({"name": "fedadam", "eta": 1}).describe() == {
        "name": "fedadam",
        "eta": 1.0,
        "eta_l": None,
        "beta_1": 0.9,
        "beta_2": 0.99,
        "tau": 0.001,
    }
    for name, spec in SPECS.items():
        described = build_strategy(spec).describe()
        assert described["name"] == name and all(described[k] == v for k, v in spec.items())


def test_registry_holds_the_builtin_strategies():
    """Every documented name maps to a Strategy subclass whose name is that name."""
    assert sorted(STRATEGIES) == sorted(SPECS)
    assert all(issubclass(cls, Strategy) and cls.name == name for name, cls in STRATEGIES.items())
    assert [name for name, cls in STRATEGIES.items() if cls.needs_all_results] == ["fedmedian", "fedtrimmedavg"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "fedavgg"}, r"strategy.name: expected one of fedavg, fedavgm, .*fedtrimmedavg, got 'fedavgg'"),
        ({"name": 3}, r"strategy.name: expected one of .*, got 3"),
        ({"eta": 0.1}, r"strategy: expected exactly one of 'name' .* or 'class'"),
        ({"name": "fedavg", "class": "user_strategies:ClippedMean"}, "exactly one of"),
        ("fedavg", r"strategy: expected a mapping"),
        ({"name": "fedavg", "mu": 0.1}, r"strategy.mu: unknown argument \(got 0.1\); fedavg takes no arguments"),
        (
            {"name": "fedadagrad", "beta_2": 0.9},
            r"strategy.beta_2: unknown argument \(got 0.9\); fedadagrad takes eta, "
            r"eta_l, beta_1, tau",
        ),
        ({"name": "fedprox", "mu": -0.1}, r"strategy.mu: expected a number >= 0, got -0.1"),
        ({"name": "fedprox", "mu": True}, r"strategy.mu: expected a number >= 0, got True"),
        ({"name": "fedadam", "eta": "1e-3"}, r"strategy.eta: expected a number > 0, got '1e-3'"),
        ({"name": "fedadam", "eta_l": 0}, r"strategy.eta_l: expected a number > 0, got 0"),
        ({"name": "fedyogi", "beta_2": 1.0}, r"strategy.beta_2: expected a number in \[0, 1\), got 1.0"),
        ({"name": "fedavgm", "momentum": float("nan")}, r"strategy.momentum: expected a number in \[0, 1\), got nan"),
        ({"name": "scaffold", "eta_g": 0}, r"strategy.eta_g: expected a number > 0, got 0"),
        ({"name": "fedtrimmedavg", "beta": 0.5}, r"strategy.beta: expected a number in \[0, 0.5\), got 0.5"),
        (
            {"class": "user_strategies.ClippedMean"},
            r"strategy.class: 'user_strategies.ClippedMean' is not an import path",
        ),
        ({"class": "no_such_module:X"}, r"strategy.class: cannot import module 'no_such_module'"),
        ({"class": "user_strategies:Nope"}, r"strategy.class: module 'user_strategies' has no attribute 'Nope'"),
        ({"class": "fl_ray.fedavg:StreamingAverage"}, r"strategy.class: expected a subclass of .*Strategy"),
        ({"class": "user_strategies:ClippedMean", "max_norm": -1}, r"strategy.max_norm: expected a number > 0, got -1"),
        (
            {"class": "user_strategies:ClippedMean", "clip": 1},
            r"strategy.clip: unknown argument \(got 1\); "
            r"user_strategies:ClippedMean takes max_norm",
        ),
    ],
)
def test_build_strategy_names_the_bad_field_value_and_expectation(spec, message):
    """A wrong name, class, argument or value raises StrategyError naming the field, the value and what would do."""
    with pytest.raises(StrategyError, match=message):
        build_strategy(spec)


def test_a_users_strategy_loads_by_import_path_and_runs_two_rounds():
    """user_strategies:ClippedMean: each update clipped to max_norm, then averaged by samples; state counts clips."""
    strategy = build_strategy({"class": "user_strategies:ClippedMean", "max_norm": 1.0})
    assert strategy.describe() == {"name": "clipped_mean", "max_norm": 1.0}

    weights = _initial()
    strategy.initialize(weights, SITES)
    clipped = 0
    for round_ in (1, 2):
        sites = ROUND_SITES[round_ - 1]
        new, metrics, _ = _run_round(strategy, round_, weights, sites)
        updates = []
        for site in sites:
            update = {k: v - weights[k] for k, v in _site_weights(weights, round_, site).items()}
            norm = math.sqrt(sum(np.sum(u**2) for u in update.values()))
            clipped += norm > 1.0
            updates.append({k: u * min(1.0, 1.0 / norm) for k, u in update.items()})
        expected = {
            k: weights[k] + np.average([u[k] for u in updates], axis=0, weights=[SAMPLES[s] for s in sites])
            for k in weights
        }
        _assert_weights(new, expected)
        weights = new
    assert strategy.state() == {"clipped_total": clipped} and clipped > 0


def test_the_docs_example_is_the_tested_user_strategy():
    """docs/strategies.md shows tests/user_strategies.py as it is (below its module docstring)."""
    root = Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "strategies.md").read_text()
    module = (root / "tests" / "user_strategies.py").read_text()
    assert "```python\n" + module.split('"""\n\n', 1)[1] + "```" in docs
