"""The public API: one sorted __all__ at the package root, every name importable."""

import fl_ray


def test_all_is_sorted_and_every_name_resolves():
    """__all__ is sorted, and each exported name is an attribute of the package."""
    assert fl_ray.__all__ == sorted(fl_ray.__all__)
    for name in fl_ray.__all__:
        assert getattr(fl_ray, name) is not None


def test_the_documented_entry_points_are_exported():
    """`from fl_ray import JobConfig, run_job` and the Learner types work."""
    from fl_ray import JobConfig, Learner, LearnerContext, TrainResult, run_job

    assert callable(run_job) and JobConfig().num_rounds >= 1
    assert issubclass(fl_ray.ImageClassificationLearner, Learner) and LearnerContext and TrainResult
