"""The round engine without Ray: sites are learners run in threads of this process (ThreadExecutor)."""

import threading
import time

import numpy as np
import pytest

from fl_ray.config import JobConfig
from fl_ray.data import ArrayData
from fl_ray.learners import Learner, LearnerContext, TrainResult
from fl_ray.rounds import RoundEngine, RoundError, ThreadExecutor
from fl_ray.strategies import build_strategy
from fl_ray.tracking.writers import MLflowWriter

from recording_sender import RecordingSender

DIM = 3


def target(site: str) -> np.ndarray:
    """Each site's optimum of its quadratic loss 0.5 * ||w - t||^2."""
    n = int(site.rsplit("-", 1)[1])
    return np.array([n, -n, 2.0 * n], dtype=np.float64)


def samples(site: str) -> int:
    return 10 * int(site.rsplit("-", 1)[1])


class QuadraticLearner(Learner):
    """Gradient steps on 0.5 * ||w - t_site||^2 (plus FedProx's proximal term when sent ``mu``); a site
    named in ``fail`` raises, one in ``slow`` sleeps ``seconds`` first; it counts its rounds in its site state."""

    def __init__(self, steps: int = 2, lr: float = 0.5, fail: tuple = (), slow: tuple = (), seconds: float = 0.0):
        self.steps, self.lr, self.fail, self.slow, self.seconds = steps, lr, fail, slow, seconds
        self.released = threading.Event()

    def get_weights(self):
        return {"w": np.zeros(DIM)}

    def train(self, weights, ctx):
        if ctx.site in self.fail:
            raise RuntimeError(f"{ctx.site} breaks")
        if ctx.site in self.slow:
            self.released.wait(self.seconds)
        w0 = np.asarray(weights["w"], dtype=np.float64)
        w, mu = w0.copy(), float(ctx.round_config.get("mu", 0.0))
        for _ in range(self.steps):
            w -= self.lr * ((w - target(ctx.site)) + mu * (w - w0))
        ctx.site_state["rounds"] = ctx.site_state.get("rounds", np.zeros(1)) + 1
        return TrainResult({"w": w}, samples(ctx.site), {"distance": float(np.linalg.norm(w - target(ctx.site)))})

    def evaluate(self, weights, ctx):
        goal = target(ctx.site) if ctx.site != "server" else np.mean([target(f"site-{i}") for i in (1, 2, 3)], 0)
        return {"distance": float(np.linalg.norm(np.asarray(weights["w"]) - goal))}


def context(site: str, cfg: JobConfig, sender=None) -> LearnerContext:
    data = ArrayData(
        np.zeros((samples(site) if site != "server" else 5, 1)), np.zeros(samples(site) if site != "server" else 5)
    )
    return LearnerContext(
        site=site,
        config=cfg,
        data=data,
        num_classes=2,
        input_shape=(1,),
        mlflow=MLflowWriter(sender) if sender is not None else None,
    )


def engine(tmp_path, learner=None, sites=3, **settings):
    cfg = JobConfig.model_validate({"sites": sites, "min_clients": 1, "seed": 3, **settings})
    learner = learner or QuadraticLearner()
    server_log = RecordingSender("server")
    names = cfg.site_names
    executor = ThreadExecutor({s: learner for s in names}, {s: context(s, cfg) for s in names})
    return RoundEngine(
        cfg,
        learner,
        context("server", cfg, server_log),
        build_strategy(cfg.strategy),
        executor,
        tmp_path / "checkpoints",
    ), server_log


def local_update(w0, site, steps=2, lr=0.5, mu=0.0):
    w = np.array(w0, dtype=np.float64)
    for _ in range(steps):
        w = w - lr * ((w - target(site)) + mu * (w - w0))
    return w


def test_fedavg_round_is_the_sample_weighted_average_of_local_updates(tmp_path):
    """Two rounds with every site: the global weights are the sample-weighted mean of each site's update."""
    eng, log = engine(tmp_path)
    w = np.zeros(DIM)
    for r in (1, 2):
        summary = eng.run_round(r)
        sites = ["site-1", "site-2", "site-3"]
        w = sum(samples(s) * local_update(w, s) for s in sites) / sum(samples(s) for s in sites)
        np.testing.assert_allclose(eng.weights["w"], w)
        assert summary["completed"] == sites and summary["failures"] == {}
    assert [step for step in log.steps("global_distance")] == [1, 2]


def test_a_failing_site_does_not_fail_the_round(tmp_path):
    """A site whose learner raises is reported with its error; the others are averaged."""
    eng, log = engine(tmp_path, QuadraticLearner(fail=("site-2",)))
    summary = eng.run_round(1)
    assert summary["completed"] == ["site-1", "site-3"]
    assert summary["failures"] == {"site-2 (attempt 1)": "RuntimeError: site-2 breaks"}
    expected = (10 * local_update(np.zeros(DIM), "site-1") + 30 * local_update(np.zeros(DIM), "site-3")) / 40
    np.testing.assert_allclose(eng.weights["w"], expected)
    assert log.metrics()["sites_failed"] == [(1, 1.0)]


def test_a_straggler_is_left_behind_after_the_round_timeout(tmp_path):
    """A site slower than round_timeout is reported as a straggler; the round goes on without it."""
    learner = QuadraticLearner(slow=("site-3",), seconds=30)
    eng, _ = engine(tmp_path, learner, round_timeout=1.0)
    started = time.monotonic()
    summary = eng.run_round(1)
    learner.released.set()
    assert time.monotonic() - started < 10
    assert summary["completed"] == ["site-1", "site-2"]
    assert "straggler" in summary["failures"]["site-3 (attempt 1)"]


def test_wait_after_min_results_cuts_the_round_short(tmp_path):
    """Once min_clients results are in, the round waits only wait_after_min_results for the rest."""
    learner = QuadraticLearner(slow=("site-3",), seconds=30)
    eng, _ = engine(tmp_path, learner, min_clients=2, wait_after_min_results=0.5)
    started = time.monotonic()
    summary = eng.run_round(1)
    learner.released.set()
    assert time.monotonic() - started < 10 and summary["completed"] == ["site-1", "site-2"]


def test_below_min_clients_the_round_is_retried_then_fails(tmp_path):
    """Fewer than min_clients results in every attempt: a RoundError naming the attempts, a failure text logged."""
    eng, log = engine(tmp_path, QuadraticLearner(fail=("site-2", "site-3")), min_clients=2, round_retries=2)
    with pytest.raises(RoundError, match=r"round 1: fewer than min_clients=2 .* in 3 attempt"):
        eng.run_round(1)
    texts = [e for e in log.events if e[0] == "text"]
    assert texts and "site-3 (attempt 3)" in texts[0][2]


def test_site_state_over_its_budget_fails_the_round_naming_the_setting(tmp_path):
    """What the sites keep (8 bytes each here) beyond resources.site_state_mb fails the job with a clear error."""
    eng, _ = engine(tmp_path, resources={"site_state_mb": 16e-6})  # 16 bytes: two sites' counters
    with pytest.raises(RoundError, match=r"takes 0.0 MB for 3 sites, over resources.site_state_mb=1.6e-05"):
        eng.run_round(1)


def test_site_state_is_carried_between_a_sites_rounds_and_checkpointed(tmp_path):
    """What a learner keeps in ctx.site_state comes back in the site's next round, also after a resume."""
    eng, _ = engine(tmp_path, sample_fraction=1.0)
    eng.run_round(1)
    eng.run_round(2)
    assert {s: int(st["rounds"][0]) for s, st in eng.site_states.items()} == {"site-1": 2, "site-2": 2, "site-3": 2}
    resumed, _ = engine(tmp_path)
    assert {s: int(st["rounds"][0]) for s, st in resumed.site_states.items()} == {"site-1": 2, "site-2": 2, "site-3": 2}


def test_resume_continues_exactly_with_the_strategy_state(tmp_path):
    """Two rounds, a new engine from the checkpoint, two more: the same weights and sampling as four
    rounds in one go, with a strategy that keeps server state (FedAdam's moments)."""
    settings = {"sample_fraction": 0.67, "strategy": {"name": "fedadam", "eta": 0.3}}
    straight, _ = engine(tmp_path / "a", **settings)
    plain = [straight.run_round(r) for r in (1, 2, 3, 4)]
    first, _ = engine(tmp_path / "b", **settings)
    first.run_round(1)
    first.run_round(2)
    second, _ = engine(tmp_path / "b", **settings)
    assert [r["round"] for r in second.rounds] == [1, 2]
    resumed = [second.run_round(r) for r in (3, 4)]
    np.testing.assert_allclose(second.weights["w"], straight.weights["w"])
    assert [r["sampled"] for r in resumed] == [r["sampled"] for r in plain[2:]]


def test_federated_evaluation_every_n_rounds(tmp_path):
    """Every evaluate_every rounds, sites evaluate the global model on their own data: per-site metrics in
    the summary and their sample-weighted mean on the server run."""
    eng, log = engine(tmp_path, evaluate_every=2, evaluate_fraction=1.0)
    assert "federated_evaluation" not in eng.run_round(1)
    summary = eng.run_round(2)
    fed = summary["federated_evaluation"]
    assert sorted(fed["sites"]) == ["site-1", "site-2", "site-3"]
    w = eng.weights["w"]
    distances = {s: float(np.linalg.norm(w - target(s))) for s in fed["sites"]}
    assert {s: r["metrics"]["distance"] for s, r in fed["sites"].items()} == pytest.approx(distances)
    mean = sum(samples(s) * d for s, d in distances.items()) / sum(samples(s) for s in distances)
    assert log.metrics()["federated_distance"] == [(2, pytest.approx(mean))]


def test_fedprox_sends_mu_and_the_learner_applies_it(tmp_path):
    """FedProx's mu reaches each sampled site's ctx.round_config; the result is FedAvg over proximal updates."""
    eng, _ = engine(tmp_path, strategy={"name": "fedprox", "mu": 1.0})
    eng.run_round(1)
    sites = ["site-1", "site-2", "site-3"]
    expected = sum(samples(s) * local_update(np.zeros(DIM), s, mu=1.0) for s in sites) / sum(map(samples, sites))
    np.testing.assert_allclose(eng.weights["w"], expected)


def test_cross_site_evaluation_scores_every_model_on_every_site(tmp_path):
    """Each site evaluates the final global model and every site's last local model on its own data."""
    eng, log = engine(tmp_path, cross_site_evaluation=True)
    eng.run_round(1)
    before = len(log.events)
    matrix = eng.cross_site_evaluation()
    sites = ["site-1", "site-2", "site-3"]
    assert list(matrix) == ["global", *sites] and all(list(row) == sites for row in matrix.values())
    local = {s: local_update(np.zeros(DIM), s) for s in sites}
    for model, weights in {"global": eng.weights["w"], **local}.items():
        for site in sites:
            assert matrix[model][site]["distance"] == pytest.approx(float(np.linalg.norm(weights - target(site))))
    assert len(log.events) == before  # nothing logged to the server run; the matrix goes to the parent run
