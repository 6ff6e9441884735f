"""fl_ray: federated learning on Ray, with every site's tracking delivered through the server."""

__version__ = "0.1.0"

from fl_ray.config import ConfigError, JobConfig, load_config
from fl_ray.job import JobResult, run_job
from fl_ray.learners import ImageClassificationLearner, Learner, LearnerContext, TrainResult
from fl_ray.receivers.base import MemoryReceiver, Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.writers import MLflowWriter, SummaryWriter, WandBWriter

__all__ = [
    "ConfigError",
    "EventKind",
    "ImageClassificationLearner",
    "JobConfig",
    "JobResult",
    "Learner",
    "LearnerContext",
    "MLflowWriter",
    "MemoryReceiver",
    "Receiver",
    "ReceiverContext",
    "SummaryWriter",
    "TrackingEvent",
    "TrainResult",
    "WandBWriter",
    "__version__",
    "load_config",
    "run_job",
]
