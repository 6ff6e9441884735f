"""A strategy in a real job on Ray: tracking knows it, and sites evaluate the global model every N rounds."""

import pytest
from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, load_config, run_job
from fl_ray.strategies import build_strategy

from conftest import NO_DATA, REPO

SITES = ["site-1", "site-2", "site-3"]


def test_the_strategy_is_tracked_and_sites_evaluate_the_global_model(ray_session, workspace):
    """FedAvgM over three sites with federated evaluation every 2 rounds and cross-site evaluation at the end:
    the parent run's params name the strategy and its arguments, the server run logs what the strategy
    reports each round and the sample-weighted mean of the sites' evaluations, each evaluating site's run
    gets its own, and the site x model matrix is in result.json and a table of the parent run."""
    cfg = JobConfig.model_validate(
        {
            "name": "fedavgm-job",
            "num_rounds": 4,
            "sites": SITES,
            "min_clients": 3,
            "dataset": NO_DATA,
            "learner": "user_learners:KnownValuesLearner",
            "strategy": {"name": "fedavgm", "momentum": 0.5},
            "evaluate_every": 2,
            "evaluate_fraction": 1.0,
            "cross_site_evaluation": True,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "tracking": {"system_metrics": False, "receivers": [{"type": "mlflow", "buffer_flush_time": 0.2}]},
        }
    )
    result = run_job(cfg, workspace=workspace, show_progress=False)
    assert result.status == "FINISHED"
    assert [("federated_evaluation" in r) for r in result.rounds] == [False, True, False, True]

    runs = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(runs["tracking_uri"])
    params = client.get_run(runs["parent_run_id"]).data.params
    assert params["strategy.name"] == "fedavgm" and params["strategy.momentum"] == "0.5"
    server = runs["run_ids"]["server"]
    norms = client.get_metric_history(server, "strategy/pseudo_gradient_norm")
    assert sorted(m.step for m in norms) == [1, 2, 3, 4] and all(m.value > 0 for m in norms)
    fed = result.rounds[3]["federated_evaluation"]
    assert sorted(fed["sites"]) == SITES and all(r["num_samples"] > 0 for r in fed["sites"].values())
    accuracy = [r["metrics"]["accuracy"] for r in fed["sites"].values()]
    assert len(set(accuracy)) == 1 and accuracy[0] == result.rounds[3]["global"]["accuracy"]
    mean = client.get_metric_history(server, "federated_accuracy")
    assert [(m.step, m.value) for m in sorted(mean, key=lambda m: m.step)] == [
        (r, result.rounds[r - 1]["federated_evaluation"]["mean"]["accuracy"]) for r in (2, 4)
    ]
    for site in SITES:
        own = client.get_metric_history(runs["run_ids"][site], "federated_loss")
        assert sorted((m.step, m.value) for m in own) == [(2, 0.5), (4, 0.25)]
    matrix = result.cross_site_evaluation["matrix"]
    assert list(matrix) == ["global", *SITES] and all(sorted(row) == SITES for row in matrix.values())
    assert matrix["global"]["site-1"]["accuracy"] == result.rounds[3]["global"]["accuracy"]
    # KnownValuesLearner: a site's local model is the round's global weights + its site number; accuracy = w[0]
    assert matrix["site-2"]["site-3"]["accuracy"] - matrix["site-1"]["site-3"]["accuracy"] == pytest.approx(1.0)
    artifacts = [a.path for a in client.list_artifacts(runs["parent_run_id"])]
    assert "cross_site_evaluation.json" in artifacts


@pytest.mark.parametrize(
    "name, strategy", [("fedprox_digits", "fedprox"), ("fedadam_digits", "fedadam"), ("scaffold_digits", "scaffold")]
)
def test_strategy_example_configs_are_valid(name, strategy):
    """Each family's example config loads, builds its strategy, and splits digits non-IID (Dirichlet 0.1)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert build_strategy(cfg.strategy).name == strategy
    assert (cfg.dataset.name, cfg.dataset.partition, cfg.dataset.alpha) == ("digits", "dirichlet", 0.1)
