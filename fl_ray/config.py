"""JobConfig: the typed, validated description of a federated job.

Loaded from YAML (``load_config``), overridable with dotted ``KEY=VALUE`` pairs typed by the schema,
and checked completely before Ray starts: an unknown key, a wrong type or an impossible value raises
:class:`ConfigError`, whose message names the field, the value and what was expected. This module
imports no Ray.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from fl_ray.plugins import check_plugin_name

MAX_SITES = 100_000
WORKER_NAME = re.compile(r"worker-[0-9]+")  # the tracking name of a pool worker (its system metrics)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
# The tracking credentials a job may give the receiver actor (and that sites never hold).
CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
)


class ConfigError(ValueError):
    """A job configuration that cannot run; the message names each bad field, value and expectation."""


# Strict scalar types: a boolean is no number (``lr: true`` is refused, not read as 1.0) and a number
# no boolean; a float field still takes a whole number (``lr: 1``). YAML and ``--set`` values arrive typed.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Strict):
    """Which data, where it lives, and how it is split across sites."""

    name: str = Field(
        default="digits",
        description="digits, cifar10, synthetic, or package.module:Class (a fl_ray.data.DatasetSource)",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="the dataset class's constructor arguments")
    root: str | None = Field(default=None, description="local folder of the data (cifar10)")
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: Float = Field(default=0.5, gt=0, description="Dirichlet concentration (smaller: more skewed)")
    test_fraction: Float = Field(default=0.2, gt=0, lt=1, description="held-out share for the global test")
    val_fraction: Float = Field(default=0.1, ge=0, lt=1, description="share of each site's data for local validation")
    num_samples: Int = Field(default=2000, ge=10, description="size of the synthetic dataset")
    shape: tuple[Int, Int, Int] = Field(
        default=(1, 8, 8),
        description="shape (C, H, W) of a synthetic sample, e.g. [3, 32, 32] for the hello_pt_cnn model",
    )

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1:
            raise ValueError(f"every dimension must be at least 1, got {list(v)}")
        return v

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return check_plugin_name("dataset", v, "")


class ResourcesConfig(_Strict):
    """What each client actor asks Ray for, and how clients are placed on the cluster."""

    client_cpus: Float = Field(default=0.5, gt=0)
    client_gpus: Float = Field(default=0.0, ge=0)
    placement: Literal["spread", "pack"] = "spread"
    autoscale: Bool = Field(
        default=False, description="ask Ray's autoscaler for nodes instead of failing when the cluster is too small now"
    )
    server_cpus: Float = Field(default=0.5, ge=0)
    max_client_restarts: Int = Field(default=2, ge=0, description="Ray restarts of a failed client or worker actor")
    workers: Int | None = Field(
        default=None,
        ge=1,
        description="actors that run the sites: at least the number of sites gives each site its own long-lived "
        "actor; fewer run the sites as work items on a pool of that many workers; unset: one per site "
        "when the cluster holds them at client_cpus/client_gpus, else as many workers as it holds",
    )
    site_state_mb: Float = Field(
        default=1024.0,
        gt=0,
        description="budget in MB for what all sites keep between their rounds (ctx.site_state), held by the "
        "server on the driver's node and checkpointed; a round that passes it fails the job",
    )
    schedule_timeout: Float = Field(
        default=60.0, gt=0, description="seconds to wait for Ray to place all actors before failing"
    )

    @field_validator("client_gpus")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("a GPU count must be a finite number")
        if v > 1 and v != int(v):
            raise ValueError(f"a fraction of a GPU must be at most 1, or a whole number of GPUs; got {v}")
        return v


class ReceiverConfig(BaseModel):
    """One tracking back end: ``type`` plus the receiver's own parameters."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="mlflow, tensorboard, wandb, memory, or package.module:Class")

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        return check_plugin_name("receiver", v, "")

    @property
    def params(self) -> dict[str, Any]:
        """The receiver's constructor parameters."""
        return dict(self.model_extra or {})


class TrackingConfig(_Strict):
    """Where tracking records go and how clients batch them."""

    receivers: list[ReceiverConfig] = Field(default_factory=lambda: [ReceiverConfig(type="mlflow")])
    batch_size: Int = Field(default=1000, ge=1, description="events per batch sent to the receiver actor")
    flush_interval: Float = Field(default=0.2, gt=0, description="seconds between sends of a partial batch")
    max_in_flight: Int = Field(default=4, ge=1, description="unacknowledged batches per site")
    credentials: dict[str, str] = Field(
        default_factory=dict,
        description="tracking credentials for the receiver actor only (e.g. MLFLOW_TRACKING_PASSWORD); "
        "never written to config.yaml, MLflow params or the sites",
    )
    credentials_file: str | None = Field(
        default=None,
        min_length=1,
        description="a file of NAME=value lines (e.g. MLFLOW_TRACKING_PASSWORD=...) on the driver's node that "
        "only the receiver actor reads; an absolute path or one starting with ~",
    )
    close_timeout: Float = Field(default=120.0, gt=0, description="seconds to wait for receivers at job end")
    max_artifact_mb: Float = Field(
        default=100.0, gt=0, description="largest file (MB) a site may log as an artifact or in a model"
    )
    system_metrics: Bool = Field(default=True, description="sample each site's CPU, memory and GPU use")
    system_metrics_interval: Float = Field(default=10.0, gt=0, description="seconds between system-metric samples")
    log_model: Bool = Field(
        default=True, description="log the best global model to the server run at the end (receivers that can: MLflow)"
    )
    register_model_name: str | None = Field(
        default=None,
        min_length=1,
        description="also register the logged model under this name in the MLflow model registry",
    )
    site_receivers: dict[str, list[ReceiverConfig]] = Field(
        default_factory=dict,
        description="per site, receivers that run on the site's own node (entries as in receivers): that site's "
        "records are delivered there, and only keys matching share reach the server's receivers",
    )
    share: list[str] = Field(
        default_factory=list,
        description="glob patterns (fnmatch: *, ?, [seq]) of metric, param, tag and text keys that a site with "
        "site_receivers also sends to the server's receivers; empty: it sends none",
    )
    site_workspace: str = Field(
        default="~/fl_ray_sites",
        min_length=1,
        description="on each site's node, where a site with site_receivers keeps its tracking: <site_workspace>/"
        "<site>/ holds its default MLflow store and <job_id>/ its spool; an absolute path or one starting with ~",
    )
    site_credentials_file: dict[str, str] = Field(
        default_factory=dict,
        description="per site with site_receivers, a file of NAME=value lines on that site's node that only the "
        "site's own receiver actor reads; an absolute path or one starting with ~",
    )

    @field_validator("credentials")
    @classmethod
    def _known_credentials(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(CREDENTIAL_VARS))
        if unknown:
            raise ValueError(f"unknown credential(s) {unknown}; expected some of {list(CREDENTIAL_VARS)}")
        return v

    @field_validator("credentials_file", "site_workspace")
    @classmethod
    def _absolute_file(cls, v: str | None) -> str | None:
        if v is not None and not _absolute(v):
            raise ValueError(
                "expected an absolute path (or one starting with ~): the receiver actor does not "
                "run in the driver's working directory"
            )
        return v

    @field_validator("site_credentials_file")
    @classmethod
    def _absolute_site_files(cls, v: dict[str, str]) -> dict[str, str]:
        for site, path in v.items():
            if not _absolute(path):
                raise ValueError(
                    f"{site}: {path!r} is not an absolute path (nor one starting with ~): the site's receiver "
                    "actor does not run in the driver's working directory"
                )
        return v

    @field_validator("site_receivers")
    @classmethod
    def _some_site_receivers(cls, v: dict[str, list[ReceiverConfig]]) -> dict[str, list[ReceiverConfig]]:
        empty = [site for site, receivers in v.items() if not receivers]
        if empty:
            raise ValueError(f"{empty[0]}: expected a list of one or more receivers, got []")
        return v

    @field_validator("share")
    @classmethod
    def _glob_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            problem = _pattern_problem(pattern)
            if problem:
                raise ValueError(f"{pattern!r} is not a key pattern: {problem}")
        return v

    def check_sites(self, sites: list[str], workers: int | None) -> None:
        """Raise ValueError, naming the field and value, if the site-local settings name a site that is not
        one of ``sites`` or cannot be kept (``workers``: ``resources.workers``, a pool of fewer actors than sites)."""
        for field, names in (
            ("tracking.site_receivers", self.site_receivers),
            ("tracking.site_credentials_file", self.site_credentials_file),
        ):
            for name in names:
                if name not in sites:
                    close = difflib.get_close_matches(name, sites, n=1, cutoff=0.6)
                    hint = f"did you mean {close[0]!r}?" if close else f"expected one of {sites[:10]}"
                    raise ValueError(f"{field}: {name!r} is not a site of this job; {hint}")
        for name in self.site_credentials_file:
            if name not in self.site_receivers:
                raise ValueError(
                    f"tracking.site_credentials_file: site {name!r} has no tracking.site_receivers, "
                    "so nothing of it would read the file"
                )
        if self.share and not self.site_receivers:
            raise ValueError(
                f"tracking.share: {self.share!r} applies to sites with tracking.site_receivers, and none are set "
                "(without them every key goes to the server's receivers)"
            )
        if self.site_receivers and workers is not None and workers < len(sites):
            raise ValueError(
                f"tracking.site_receivers needs one actor per site (a site's receivers run on its node), but "
                f"resources.workers: {workers} runs the {len(sites)} sites on a pool; leave resources.workers unset "
                f"or set it to at least {len(sites)}"
            )


def _absolute(path: str) -> bool:
    return path.startswith("~") or Path(path).is_absolute()


def _pattern_problem(pattern: str) -> str:
    """Why ``pattern`` is no usable key glob ("" if it is one)."""
    if not pattern.strip():
        return "expected a glob such as 'val_*' or 'system/*'"
    depth = 0
    for char in pattern:
        if char == "[" and depth == 0:
            depth = 1
        elif char == "]" and depth == 1:
            depth = 0
    if depth:
        return "a '[' is not closed by ']' (write '[[]' for a literal '[')"
    return ""


class ServerConfig(_Strict):
    """How the server ranks rounds to keep the best global model (``<job>/checkpoints/best.npz`` + ``best.json``)."""

    key_metric: str = Field(
        default="accuracy", min_length=1, description="a global metric (a key of what the learner's evaluate returns)"
    )
    key_mode: Literal["max", "min"] = Field(
        default="max", description="max: higher key_metric is better; min: lower is better"
    )


class JobConfig(_Strict):
    """A federated averaging job."""

    name: str = Field(default="fedavg", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: Int = 0
    num_rounds: Int = Field(default=3, ge=1)
    sites: Union[Int, list[str]] = Field(default=2, description="a count, or the site names")
    min_clients: Int = Field(default=1, ge=1)
    sample_fraction: Float = Field(default=1.0, gt=0, le=1)
    local_epochs: Int = Field(default=1, ge=1)
    batch_size: Int = Field(default=32, ge=1)
    lr: Float = Field(default=0.05, gt=0)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    round_timeout: Float | None = Field(default=None, gt=0, description="seconds a round waits for clients")
    wait_after_min_results: Float | None = Field(
        default=None, ge=0, description="once min_clients results are in, seconds to wait for the rest"
    )
    round_retries: Int = Field(default=1, ge=0, description="retries of a round that got < min_clients results")
    learner: str = Field(
        default="fl_ray.learners:ImageClassificationLearner",
        description="image_classification, lightning, or package.module:Class (a fl_ray.Learner)",
    )
    learner_args: dict[str, Any] = Field(default_factory=dict)
    strategy: dict[str, Any] = Field(
        default_factory=lambda: {"name": "fedavg"},
        description="{name: fedavg | fedprox | ..., args} or {class: module:Class, args}",
    )
    evaluate_every: Int = Field(
        default=0, ge=0, description="every N rounds, sites evaluate the global model (0: never)"
    )
    evaluate_fraction: Float = Field(default=1.0, gt=0, le=1, description="share of sites that evaluate")
    cross_site_evaluation: Bool = Field(
        default=False,
        description="at the end, every site evaluates the final global model and each site's last local model",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    description: str = Field(
        default="", max_length=5000, description="a note on the job: the parent run's MLflow description"
    )

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_shape(cls, v: Any) -> Any:
        count = isinstance(v, int) and not isinstance(v, bool)
        if not count and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            raise ValueError(f"expected a number of sites or a list of site names (text), got {v!r}")
        return v

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: int | list[str]) -> int | list[str]:
        if isinstance(v, int):
            if not 1 <= v <= MAX_SITES:
                raise ValueError(f"need 1 to {MAX_SITES} sites")
            return v
        if not v:
            raise ValueError("the list of site names is empty")
        dup = sorted(name for name, n in Counter(v).items() if n > 1)
        if dup:
            raise ValueError(f"site names must be unique; repeated: {dup}")
        bad = [
            s
            for s in v
            if s in ("server", ".", "..")
            or not s
            or not all(c.isalnum() or c in "-_." for c in s)
            or WORKER_NAME.fullmatch(s)
        ]
        if bad:
            raise ValueError(
                f"invalid site name(s) {bad[:10]}: use letters, digits, '-', '_' or '.' "
                "(not 'server', '.', '..' or 'worker-<number>', the names of pool workers' runs)"
            )
        return v

    @field_validator("learner")
    @classmethod
    def _learner_name(cls, v: str) -> str:
        return check_plugin_name("learner", v, "")

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        script = self.learner_args.get("script") if self.learner == "script" else None
        if isinstance(script, str) and not Path(script).expanduser().is_absolute():
            # the actors do not run in the driver's working directory: the path is taken from it here
            self.learner_args["script"] = str(Path.cwd() / script)
        if self.tracking.register_model_name and not self.tracking.log_model:
            raise ValueError(
                f"tracking.register_model_name: {self.tracking.register_model_name!r} needs "
                "tracking.log_model: true (a model is registered when it is logged)"
            )
        n = len(self.site_names)
        if self.min_clients > n:
            raise ValueError(f"min_clients: {self.min_clients} is more than the {n} site(s) configured")
        self.tracking.check_sites(self.site_names, self.resources.workers)
        return self

    @property
    def site_names(self) -> list[str]:
        """The sites, by name (``site-1`` … when ``sites`` is a count)."""
        if isinstance(self.sites, int):
            return [f"site-{i}" for i in range(1, self.sites + 1)]
        return list(self.sites)

    @property
    def clients_per_round(self) -> int:
        """``max(min_clients, ceil(sample_fraction * sites))``."""
        n = len(self.site_names)
        return min(n, max(self.min_clients, math.ceil(self.sample_fraction * n)))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what config.yaml, the parent run's params and the site actors
        get), without ``tracking.credentials``: those reach the receiver actor's environment only."""
        return self.model_dump(mode="json", exclude={"tracking": {"credentials"}})


# What each type error expects, in words (pydantic's own messages name its internal types).
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "text",
    "dict_type": "a mapping of keys to values",
    "list_type": "a list",
    "model_type": "a section of keys",
    "model_attributes_type": "a section of keys",
}


def _format_errors(err: ValidationError) -> str:
    """One plain sentence per bad field: where, what was expected, what was given."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "union[")))
        value = e.get("input")
        got = "" if isinstance(value, dict) else f", got {_shown(value)}"
        if e["type"] == "extra_forbidden":
            line = f"{loc}: unknown key{f' (set to {_shown(value)})' if got else ''}; {_suggestion(e['loc'])}"
        elif e["type"] in _EXPECTED:
            line = f"{loc}: expected {_EXPECTED[e['type']]}{got}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if msg.startswith("Input should be "):
                msg = "expected " + msg.removeprefix("Input should be ")
                for bound in ("greater than", "less than"):
                    msg = msg.replace(f"expected {bound}", f"expected a value {bound}")
            elif repr(value) in msg:
                got = ""
            line = f"{loc}: {msg}{got}" if loc else msg
        lines.append(line if line.endswith((".", "?")) else line + ".")
    return "invalid job config:\n" + "\n".join("  " + line for line in dict.fromkeys(lines))


def _shown(value: Any) -> str:
    """A bad value as the user wrote it: ``true``/``false`` for booleans (as in YAML), else its repr."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return repr(value)


def _suggestion(loc: tuple[Any, ...]) -> str:
    """'did you mean ...' for an unknown key, or the keys its section has."""
    model: Any = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "check the spelling against the documented keys"
        model = annotation
    keys = [k for k in model.model_fields if k != "credentials"] + (
        ["credentials"] if "credentials" in model.model_fields else []
    )
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"expected one of {', '.join(keys)}"


def parse_config(data: dict[str, Any]) -> JobConfig:
    """Validate plain data as a JobConfig, raising ConfigError with every problem found."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid job config: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML, then typed by the schema)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. dataset.alpha=0.3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value {raw!r} is not valid YAML: {exc}") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} holds {child!r}, not a section with keys")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config (default: the one shipped in the package, fl_ray/configs/default.yaml) and apply ``--set`` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return parse_config(apply_overrides(data, overrides or []))
