"""What the strategies send, applied by the built-in learners (real torch training on a slice of digits):
FedProx's mu keeps the local model nearer the global one, the strategy's lr replaces the job's, and
SCAFFOLD's control variate is kept per site and its change returned."""

import numpy as np
import pytest
import torch

from fl_ray.config import JobConfig
from fl_ray.data import load_dataset
from fl_ray.learners import ImageClassificationLearner, LearnerContext
from fl_ray.strategies.scaffold import initial_control


@pytest.fixture(scope="module")
def digits():
    return load_dataset(JobConfig().dataset, seed=0).train.subset(np.arange(300))


def context(data, **sent) -> LearnerContext:
    cfg = JobConfig.model_validate({"local_epochs": 1, "batch_size": 32, "lr": 0.05})
    return LearnerContext(
        site="site-1",
        config=cfg,
        data=data,
        num_classes=10,
        input_shape=(1, 8, 8),
        round=1,
        **sent,
    )


def moved(learner, data, **sent) -> float:
    """How far one round of local training moves the trainable parameters from the global ones."""
    learner.setup(context(data))
    start = learner.get_weights()
    result = learner.train(start, context(data, **sent))
    module = getattr(learner, "model", None) or learner.module
    names = [name for name, _ in module.named_parameters()]
    return float(np.sqrt(sum(np.sum((result.weights[k] - start[k]) ** 2) for k in names)))


def test_fedprox_mu_keeps_the_local_model_near_the_global_one(digits):
    """The proximal term pulls training back: with a large mu the weights move far less than without."""
    free = moved(ImageClassificationLearner(), digits)
    held = moved(ImageClassificationLearner(), digits, round_config={"mu": 5.0})
    assert held < 0.5 * free


def test_the_strategy_lr_replaces_the_jobs(digits):
    """A strategy's lr (FedOpt's eta_l) is the one local training uses."""
    assert moved(ImageClassificationLearner(), digits, round_config={"lr": 1e-5}) < 0.01 * moved(
        ImageClassificationLearner(), digits
    )


def test_scaffold_control_is_kept_per_site_and_its_change_returned(digits):
    """With SCAFFOLD's payload the learner returns control_delta and keeps c_i+ in its site state; a second
    round starts from that c_i (a different correction, so different weights than a first round)."""
    learner = ImageClassificationLearner()
    learner.setup(context(digits))
    start = learner.get_weights()
    control = initial_control(start)
    ctx = context(digits, payload={"control": control})
    first = learner.train(start, ctx)
    c_i = ctx.site_state["control"]
    assert set(first.extras["control_delta"]) == set(control)
    for key in control:
        np.testing.assert_allclose(first.extras["control_delta"][key], c_i[key], rtol=1e-5, atol=1e-7)
    assert any(np.abs(v).sum() > 0 for v in c_i.values())
    second = learner.train(start, ctx)
    key = next(name for name, _ in learner.model.named_parameters())
    assert not np.allclose(second.weights[key], first.weights[key])


def test_lightning_applies_fedprox_and_refuses_scaffold(digits, tmp_path, monkeypatch):
    """The Lightning learner adds the proximal gradient for mu, and says clearly that it cannot run SCAFFOLD."""
    pytest.importorskip("lightning")
    from fl_ray.lightning import LightningLearner

    monkeypatch.chdir(tmp_path)
    module = "fl_ray.lightning:DigitsLitModule"
    free = moved(LightningLearner(module, module_args={"lr": 0.1}), digits)
    held = moved(LightningLearner(module, module_args={"lr": 0.1}), digits, round_config={"mu": 5.0})
    assert held < 0.5 * free
    learner = LightningLearner(module)
    learner.setup(context(digits))
    with pytest.raises(ValueError, match="SCAFFOLD"):
        learner.train(
            learner.get_weights(), context(digits, payload={"control": initial_control(learner.get_weights())})
        )


def test_site_seeds_depend_on_the_whole_site_name(digits):
    """Two sites whose names end alike get different seeds; the same site and round, the same seed."""
    a, b = context(digits), context(digits)
    a.site, b.site = "eu-west-site-1", "us-west-site-1"
    assert a.seed != b.seed
    b.site = "eu-west-site-1"
    assert a.seed == b.seed


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_built_in_sgd_steps_exactly_as_torch_optim(momentum):
    """fl_ray's SGD (which spares each process torch._dynamo's import) gives bit for bit torch.optim.SGD's
    weights over several steps of a digits CNN, with and without momentum."""
    from fl_ray.models import build_model
    from fl_ray.torch_learning import SGD

    torch.manual_seed(0)
    models = [build_model("digits_cnn", (1, 8, 8), 10) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        torch.optim.SGD(models[0].parameters(), lr=0.05, momentum=momentum),
        SGD(models[1].parameters(), lr=0.05, momentum=momentum),
    ]
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    for model, optimizer in zip(models, optimizers):
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
