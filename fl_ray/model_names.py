"""The names of the models the built-in learner can train (:mod:`fl_ray.models` builds them), without
importing PyTorch, so the driver can check ``learner_args.model``."""

from __future__ import annotations

MODEL_NAMES = ("digits_cnn", "hello_pt_cnn", "mlp")


def check_model_name(name: str) -> str:
    """``name`` if it is one of :data:`MODEL_NAMES`; ValueError naming ``learner_args.model`` if not."""
    if name not in MODEL_NAMES:
        raise ValueError(f"learner_args.model: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return name
