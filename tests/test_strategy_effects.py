"""Evidence that the strategies work, not only that they run: on a seeded non-IID problem with a known
optimum (each site a different quadratic), run through the round engine, each family shows its effect.

Site i minimises f_i(w) = 0.5 * sum(a_i * (w - t_i)**2) with its own curvatures a_i and optimum t_i,
in K local gradient steps per round: with K > 1 FedAvg drifts to a fixed point away from the global
optimum w* = sum(a_i t_i) / sum(a_i) (equal sample counts), which FedProx shrinks and SCAFFOLD removes.
The learner reads what each strategy sends from its context, as a user's learner would.
"""

import numpy as np
import pytest

from fl_ray.config import JobConfig
from fl_ray.data import ArrayData
from fl_ray.learners import Learner, LearnerContext, TrainResult
from fl_ray.rounds import RoundEngine, ThreadExecutor
from fl_ray.strategies import build_strategy
from fl_ray.strategies.scaffold import gradient_correction, initial_control, site_control_update
from fl_ray.tracking.writers import MLflowWriter

from recording_sender import RecordingSender

DIM, SITES, SAMPLES = 6, 5, 50
_rng = np.random.default_rng(2024)
CURVATURE = {f"site-{i + 1}": _rng.uniform(0.2, 4.0, DIM) for i in range(SITES)}
OPTIMUM = {f"site-{i + 1}": _rng.normal(0.0, 3.0, DIM) for i in range(SITES)}


def global_optimum(sites) -> np.ndarray:
    return sum(CURVATURE[s] * OPTIMUM[s] for s in sites) / sum(CURVATURE[s] for s in sites)


def global_loss(w, sites) -> float:
    return float(np.mean([0.5 * np.sum(CURVATURE[s] * (w - OPTIMUM[s]) ** 2) for s in sites]))


class QuadraticSite(Learner):
    """K gradient steps on the site's quadratic; applies ``lr`` and ``mu`` from ctx.round_config and
    SCAFFOLD's control from ctx.payload / ctx.site_state. The site named ``attacker`` sends its weights
    times ``scale`` (a faulty or malicious site)."""

    def __init__(
        self,
        steps: int = 10,
        lr: float = 0.1,
        attacker: str | None = None,
        scale: float = 100.0,
        honest: tuple = tuple(CURVATURE),
    ):
        self.steps, self.lr, self.attacker, self.scale, self.honest = steps, lr, attacker, scale, honest

    def get_weights(self):
        return {"w": np.zeros(DIM)}

    def train(self, weights, ctx):
        x = np.asarray(weights["w"], dtype=np.float64)
        a, t = CURVATURE[ctx.site], OPTIMUM[ctx.site]
        lr, mu = float(ctx.round_config.get("lr", self.lr)), float(ctx.round_config.get("mu", 0.0))
        control = ctx.payload.get("control")
        site_control = correction = None
        if control is not None:
            site_control = ctx.site_state.get("control") or initial_control(control)
            correction = gradient_correction(control, site_control)["w"]
        w = x.copy()
        for _ in range(self.steps):
            grad = a * (w - t) + mu * (w - x)
            w -= lr * (grad if correction is None else grad + correction)
        extras = {}
        if control is not None:
            ctx.site_state["control"], extras["control_delta"] = site_control_update(
                site_control, control, weights, {"w": w}, self.steps, lr
            )
        if ctx.site == self.attacker:
            w = w * self.scale
        return TrainResult({"w": w}, SAMPLES, {}, extras)

    def evaluate(self, weights, ctx):
        w = np.asarray(weights["w"])
        return {"loss": global_loss(w, self.honest), "distance": float(np.linalg.norm(w - global_optimum(self.honest)))}


def run(tmp_path, strategy, rounds=60, sites=SITES, **learner_args) -> tuple[np.ndarray, list[dict]]:
    """The global weights after ``rounds`` rounds of ``strategy`` over ``sites`` sites, and the summaries."""
    cfg = JobConfig.model_validate({"sites": sites, "min_clients": 1, "seed": 5, "strategy": strategy})
    learner = QuadraticSite(**learner_args)

    def ctx(site):
        return LearnerContext(
            site=site,
            config=cfg,
            data=ArrayData(np.zeros((SAMPLES, 1)), np.zeros(SAMPLES)),
            num_classes=1,
            input_shape=(DIM,),
            mlflow=MLflowWriter(RecordingSender(site)),
        )

    executor = ThreadExecutor({s: learner for s in cfg.site_names}, {s: ctx(s) for s in cfg.site_names})
    engine = RoundEngine(
        cfg, learner, ctx("server"), build_strategy(strategy), executor, tmp_path / strategy["name"] / "checkpoints"
    )
    summaries = [engine.run_round(r) for r in range(1, rounds + 1)]
    executor.shutdown()
    return engine.weights["w"], summaries


def distance(w, sites=tuple(CURVATURE)) -> float:
    return float(np.linalg.norm(w - global_optimum(sites)))


def test_fedprox_and_scaffold_reduce_client_drift(tmp_path):
    """With 10 local steps on different quadratics FedAvg settles away from the optimum; FedProx (mu=3)
    ends closer, and SCAFFOLD's control variates take the drift away almost entirely."""
    fedavg, _ = run(tmp_path, {"name": "fedavg"})
    fedprox, _ = run(tmp_path, {"name": "fedprox", "mu": 3.0})
    scaffold, _ = run(tmp_path, {"name": "scaffold"})
    drift = distance(fedavg)
    assert drift > 0.3, "the problem should make FedAvg drift"
    assert distance(fedprox) < 0.7 * drift
    assert distance(scaffold) < 0.01 * drift


def test_fedadam_converges(tmp_path):
    """FedAdam moves the global model to the fixed point of the local updates (FedAvg's) and stays there:
    the loss falls by more than 95% of its starting gap, and the last rounds barely move."""
    fedavg, _ = run(tmp_path, {"name": "fedavg"}, rounds=100)
    fedadam, summaries = run(tmp_path, {"name": "fedadam", "eta": 0.3, "tau": 0.01}, rounds=100)
    start = global_loss(np.zeros(DIM), tuple(CURVATURE)) - global_loss(fedavg, tuple(CURVATURE))
    end = global_loss(fedadam, tuple(CURVATURE)) - global_loss(fedavg, tuple(CURVATURE))
    assert end < 0.05 * start
    assert np.linalg.norm(fedadam - fedavg) < 0.05 * np.linalg.norm(fedavg)
    assert summaries[-1]["strategy"]["update_norm"] < 0.02


@pytest.mark.parametrize("strategy", [{"name": "fedmedian"}, {"name": "fedtrimmedavg", "beta": 0.2}])
def test_robust_aggregators_resist_a_site_sending_scaled_weights(tmp_path, strategy):
    """One site of five sends its weights x100: FedAvg is thrown off by orders of magnitude, while the
    median and the trimmed mean keep the honest sites' loss near what FedAvg over the four honest
    sites alone reaches."""
    honest = tuple(f"site-{i}" for i in range(1, 5))
    reference, _ = run(tmp_path / "honest", {"name": "fedavg"}, rounds=30, sites=list(honest), honest=honest)
    attacked, _ = run(tmp_path / "avg", {"name": "fedavg"}, rounds=30, attacker="site-5", honest=honest)
    robust, summaries = run(tmp_path / "robust", strategy, rounds=30, attacker="site-5", honest=honest)
    honest_loss = global_loss(reference, honest)
    assert global_loss(attacked, honest) > 1e6 * honest_loss
    assert global_loss(robust, honest) < 1.5 * honest_loss
    assert summaries[-1]["strategy"]["results_trimmed"] >= 2
