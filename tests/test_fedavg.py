"""FedAvg math against direct NumPy computations."""

import numpy as np
import pytest

from fl_ray.fedavg import AggregationError, StreamingAverage, sample_sites, weighted_average, weighted_metrics


def _state(rng, dtype):
    return {"w": rng.normal(size=(4, 3)).astype(dtype), "b": rng.normal(size=3).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_average_matches_numpy_weighted_average(dtype):
    """Unequal weights: the streaming result equals np.average over the stacked states, in the input dtype."""
    rng = np.random.default_rng(0)
    states = [_state(rng, dtype) for _ in range(5)]
    weights = [10, 1, 250, 37, 3]

    result = weighted_average(list(zip(states, weights)))

    for key in ("w", "b"):
        expected = np.average(np.stack([s[key].astype(np.float64) for s in states]), axis=0, weights=weights)
        assert result[key].dtype == dtype
        np.testing.assert_allclose(result[key], expected, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_integer_buffers_are_averaged_and_rounded_in_their_dtype():
    """BatchNorm's num_batches_tracked (int64) stays an int64 counter: the rounded weighted mean."""
    avg = StreamingAverage()
    avg.add({"num_batches_tracked": np.array(10, dtype=np.int64)}, 1)
    avg.add({"num_batches_tracked": np.array(21, dtype=np.int64)}, 2)

    out = avg.result()["num_batches_tracked"]

    assert out.dtype == np.int64
    assert out == round((10 * 1 + 21 * 2) / 3)  # 17.33 -> 17


def test_streaming_average_keeps_one_running_sum():
    """Adding more results does not grow memory: the sums stay one model in size."""
    rng = np.random.default_rng(1)
    avg = StreamingAverage()
    for _ in range(20):
        avg.add(_state(rng, np.float32), 5)
    assert set(avg._sums) == {"w", "b"} and avg._sums["w"].shape == (4, 3)
    assert avg.count == 20 and avg.total_weight == 100


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"w": np.zeros((4, 3))}, "missing"),
        ({"w": np.zeros((2, 3)), "b": np.zeros(3)}, "shape"),
    ],
)
def test_mismatched_results_raise(bad, message):
    """A result whose keys or shapes differ from earlier ones is refused with the reason."""
    avg = StreamingAverage()
    avg.add({"w": np.zeros((4, 3)), "b": np.zeros(3)}, 1)
    with pytest.raises(AggregationError, match=message):
        avg.add(bad, 1)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_non_positive_weight_is_refused(weight):
    """A sample count must be positive and finite."""
    with pytest.raises(AggregationError, match="weight"):
        StreamingAverage().add({"w": np.zeros(2)}, weight)


def test_empty_average_raises():
    """No results, no average."""
    with pytest.raises(AggregationError):
        StreamingAverage().result()


def test_weighted_metrics_weights_by_samples_and_skips_missing():
    """Each metric is averaged over the results that report it, weighted by sample count."""
    out = weighted_metrics([({"loss": 1.0, "acc": 0.5}, 10), ({"loss": 3.0}, 30)])
    assert out["loss"] == pytest.approx((1 * 10 + 3 * 30) / 40)
    assert out["acc"] == pytest.approx(0.5)


def test_sample_sites_is_seeded_and_distinct():
    """Same seed, same choice; the count is exact and sites are distinct, in configured order."""
    sites = [f"site-{i}" for i in range(10)]
    a = sample_sites(sites, 4, np.random.default_rng(7))
    b = sample_sites(sites, 4, np.random.default_rng(7))
    assert a == b and len(set(a)) == 4 and a == sorted(a, key=sites.index)
    with pytest.raises(ValueError):
        sample_sites(sites, 11, np.random.default_rng(0))
