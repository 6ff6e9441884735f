"""learner: script and fl_ray.client without Ray: a script gets the round's task and hands back its result;
mistakes fail with the field, the value and what was expected."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from fl_ray import client
from fl_ray.config import JobConfig
from fl_ray.data import ArrayData
from fl_ray.learners import LearnerContext, load_learner

SCRIPT = """
import torch
from torch import nn

import fl_ray.client as flare


class Net(nn.Module):
    def __init__(self, width=2):
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(x)


if __name__ == "__main__":
    task = flare.receive()
    model = Net()
    model.load_state_dict(task.weights)
    with torch.no_grad():
        model.fc.bias += task.round
    {send}
"""


def context(round_: int = 1) -> LearnerContext:
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    return LearnerContext(
        site="site-1",
        config=JobConfig(learner="script", learner_args={"script": "unused"}),
        data=ArrayData(x, np.array([0, 1, 0, 1])),
        num_classes=2,
        input_shape=(2,),
        round=round_,
    )


def script(tmp_path, send: str = 'flare.send(model.state_dict(), len(task.data[1]), {"seen": task.round})'):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(SCRIPT.replace("{send}", send)))
    return str(path)


def test_the_script_trains_from_the_global_weights_each_round(tmp_path):
    learner = load_learner("script", {"script": script(tmp_path)})
    learner.setup(context())
    start = learner.get_weights()
    result = learner.train(start, context(round_=2))
    assert result.num_samples == 4 and result.metrics == {"seen": 2.0}
    np.testing.assert_allclose(result.weights["fc.bias"], start["fc.bias"] + 2)
    np.testing.assert_allclose(result.weights["fc.weight"], start["fc.weight"])
    assert not client.is_running()  # the task is gone once the script ends
    assert set(learner.evaluate(start, context())) == {"loss", "accuracy"}


def test_a_relative_script_path_is_taken_from_the_directory_the_job_starts_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig(learner="script", learner_args={"script": "train.py"})
    assert cfg.learner_args["script"] == str(tmp_path / "train.py")
    assert JobConfig.model_validate(cfg.model_dump()).learner_args == cfg.learner_args  # as the actors get it


def test_mistakes_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"learner_args.script: 'nowhere.py' is not a file"):
        load_learner("script", {"script": "nowhere.py"})
    with pytest.raises(TypeError, match=r"learner_args.model: .* defines no torch.nn.Module class 'Missing'"):
        load_learner("script", {"script": script(tmp_path), "model": "Missing"}).setup(context())
    learner = load_learner("script", {"script": script(tmp_path, send="pass")})
    learner.setup(context())
    with pytest.raises(
        RuntimeError, match=r"ended without calling fl_ray.client.send\(...\) \(site 'site-1', round 1\)"
    ):
        learner.train(learner.get_weights(), context())
    learner = load_learner("script", {"script": script(tmp_path, send="flare.send(model.state_dict(), -1)")})
    learner.setup(context())
    with pytest.raises(ValueError, match="num_samples must be an integer >= 0, got -1"):
        learner.train(learner.get_weights(), context())
    with pytest.raises(RuntimeError, match="not running as an fl_ray site"):
        client.receive()
