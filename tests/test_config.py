"""Job config: defaults, overrides typed by the schema, and every bad input stopped before Ray starts."""

import subprocess
import sys

import pytest

from fl_ray.config import DEFAULT_CONFIG, ConfigError, JobConfig, apply_overrides, load_config, parse_config

from conftest import REPO


def test_default_config_is_the_digits_job():
    """The default config (fl_ray/configs/default.yaml): 2 sites, >= 3 rounds, digits, IID."""
    cfg = load_config()
    assert cfg.site_names == ["site-1", "site-2"]
    assert cfg.num_rounds >= 3
    assert cfg.dataset.name == "digits" and cfg.dataset.partition == "iid"


def test_overrides_are_typed_by_the_schema():
    """--set values are parsed as YAML and checked against the schema; dotted keys reach sections."""
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            "num_rounds=7",
            "dataset.partition=dirichlet",
            "dataset.alpha=0.3",
            "sites=[a, b, c]",
            "resources.client_gpus=0.25",
        ],
    )
    assert cfg.num_rounds == 7 and cfg.dataset.alpha == 0.3 and cfg.dataset.partition == "dirichlet"
    assert cfg.site_names == ["a", "b", "c"] and cfg.resources.client_gpus == 0.25


def test_clients_per_round_follows_min_clients_and_fraction():
    """max(min_clients, ceil(sample_fraction * n))."""
    assert JobConfig(sites=10, sample_fraction=0.25, min_clients=2).clients_per_round == 3
    assert JobConfig(sites=10, sample_fraction=0.1, min_clients=4).clients_per_round == 4


@pytest.mark.parametrize(
    "data, field, value, expected",
    [
        ({"num_rouns": 3}, "num_rouns", "3", "unknown key"),
        ({"num_rounds": "many"}, "num_rounds", "'many'", "integer"),
        ({"num_rounds": 0}, "num_rounds", "0", "greater than or equal to 1"),
        ({"sites": 2, "min_clients": 3}, "min_clients", "3", "more than the 2 site"),
        ({"sample_fraction": 0}, "sample_fraction", "0", "greater than 0"),
        ({"sample_fraction": 1.5}, "sample_fraction", "1.5", "less than or equal to 1"),
        ({"dataset": {"name": "mnist"}}, "dataset.name", "'mnist'", "digits, cifar10, synthetic or an import path"),
        ({"dataset": {"partition": "by-label"}}, "dataset.partition", "'by-label'", "'iid' or 'dirichlet'"),
        ({"resources": {"client_cpus": -1}}, "resources.client_cpus", "-1", "greater than 0"),
        ({"learner": "not_a_path"}, "learner", "'not_a_path'", "package.module:Class"),
        ({"tracking": {"receivers": [{"type": "mlfow"}]}}, "tracking.receivers.0.type", "'mlfow'", "expected one of"),
        ({"sites": ["a", "a"]}, "sites", "'a'", "unique"),
        ({"sites": ["a", ".."]}, "sites", "'..'", "not 'server'"),
        ({"sites": ["a", "worker-2"]}, "sites", "'worker-2'", "'worker-<number>'"),
        ({"sites": True}, "sites", "True", "a number of sites or a list of site names"),
        ({"sites": "a"}, "sites", "'a'", "or a list of site names"),
        ({"sites": 0}, "sites", "0", "need 1 to 100000 sites"),
        ({"resources": {"workers": 0}}, "resources.workers", "0", "greater than or equal to 1"),
        ({"resources": {"site_state_mb": 0}}, "resources.site_state_mb", "0", "greater than 0"),
    ],
)
def test_bad_config_names_field_value_and_expectation(data, field, value, expected):
    """Each bad input raises ConfigError naming the field, the value and what is expected."""
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    message = str(err.value)
    assert field in message and value in message and expected in message, message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("num_rounds", "expected KEY=VALUE"),
        ("num_rounds.x=1", "not a section"),
    ],
)
def test_malformed_overrides_are_config_errors(override, expected):
    """A --set without '=' or into a scalar is refused with the override quoted."""
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({"num_rounds": 3}, [override])


def _cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_fedavg.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "num_rounds=0"], "num_rounds"),
        (["--set", "min_clients=5"], "min_clients"),
        (["--set", "sample_fraction=2"], "sample_fraction"),
        (["--set", "dataset.name=imagenet"], "dataset.name"),
        (["--set", "nonsense=1"], "nonsense"),
        (["--set", "strategy.name=fedprox", "--set", "strategy.bogus=1"], "strategy.bogus"),
        (["--config", "configs/does_not_exist.yaml"], "does_not_exist.yaml"),
        (["--set", "learner_args={model: nosuch}"], "learner_args.model"),
        (["--set", "learner_args={bogus: 1}"], "learner_args.bogus"),
    ],
)
def test_cli_bad_input_exits_2_before_ray_starts(tmp_path, args, field):
    """The script prints the problem and exits with status 2, creating no job and starting no Ray."""
    proc = _cli("--workspace", str(tmp_path / "ws"), *args)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr
    assert not (tmp_path / "ws").exists()
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_cli_help_documents_every_option():
    """--help names every option."""
    proc = _cli("--help")
    assert proc.returncode == 0
    for option in ("--config", "--workspace", "--address", "--set", "KEY=VALUE", "RAY_ADDRESS"):
        assert option in proc.stdout


def test_credentials_in_the_config_are_never_written_out():
    """tracking.credentials stay out of to_dict (config.yaml, the parent run's params, the sites' config)."""
    cfg = load_config(DEFAULT_CONFIG, ["tracking.credentials={MLFLOW_TRACKING_PASSWORD: s3cret}"])
    assert cfg.tracking.credentials == {"MLFLOW_TRACKING_PASSWORD": "s3cret"}
    assert "s3cret" not in str(cfg.to_dict()) and "credentials" not in cfg.to_dict()["tracking"]
    assert parse_config(cfg.to_dict()).tracking.credentials == {}


def test_unknown_credential_names_are_refused():
    """Only the documented tracking variables can be given as credentials."""
    with pytest.raises(ConfigError, match="AWS_SECRET"):
        parse_config({"tracking": {"credentials": {"AWS_SECRET": "x"}}})


@pytest.mark.parametrize(
    "override, field",
    [
        ("lr=true", "lr"),
        ("num_rounds=true", "num_rounds"),
        ("min_clients=true", "min_clients"),
        ("local_epochs=true", "local_epochs"),
        ("batch_size=true", "batch_size"),
        ("seed=false", "seed"),
        ("dataset.alpha=true", "dataset.alpha"),
        ("resources.client_gpus=true", "resources.client_gpus"),
        ("tracking.system_metrics=1", "tracking.system_metrics"),
        ("cross_site_evaluation=0", "cross_site_evaluation"),
    ],
)
def test_booleans_and_numbers_are_not_taken_for_each_other(override, field):
    """`--set lr=true` is refused (it is not 1.0), and so is a number where a boolean is expected."""
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG, [override])
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(field + ":"))
    assert "expected" in line and override.split("=")[1] in line, line


def test_whole_numbers_still_fill_number_fields():
    """A float field takes a whole number from YAML or --set (`lr=1`), typed as a float."""
    cfg = load_config(DEFAULT_CONFIG, ["lr=1", "dataset.alpha=2", "tracking.system_metrics=false"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.dataset.alpha == 2.0
    assert cfg.tracking.system_metrics is False


@pytest.mark.parametrize(
    "data, sentence",
    [
        ({"num_rouns": 3}, "num_rouns: unknown key (set to 3); did you mean 'num_rounds'?"),
        ({"resources": {"client_cpu": 1}}, "resources.client_cpu: unknown key (set to 1); did you mean 'client_cpus'?"),
        ({"sites": [1, 2]}, "sites: expected a number of sites or a list of site names (text), got [1, 2]."),
        (
            {"learner": "x"},
            "learner: expected one of image_classification, lightning, script or an import path "
            "'package.module:Class', got 'x'.",
        ),
    ],
)
def test_each_error_is_one_plain_sentence(data, sentence):
    """One sentence per bad field, with a "did you mean" for a misspelt key and no validation-library internals."""
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value).splitlines()[1:] == ["  " + sentence]
