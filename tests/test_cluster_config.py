"""configs/cluster/gpu-cluster.yaml against Ray's own cluster-config schema and what fl_ray relies on.

``ray up`` runs ``prepare_config`` (merge with the provider's defaults) and ``validate_config``
(ray/autoscaler/ray-schema.json plus a few cross-field checks) before it talks to the cloud; these
tests run the same two steps offline, then check the parts of the file the docs and jobs depend on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
import ray  # noqa: E402
import ray.autoscaler  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "configs" / "cluster" / "gpu-cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def _commands(config: dict[str, Any], key: str) -> str:
    return "\n".join(config.get(key) or [])


def test_file_matches_ray_schema(config):
    """The file as written is valid against the ray-schema.json that this Ray ships."""
    schema = json.loads(SCHEMA.read_text())

    jsonschema.validate(config, schema)


def test_ray_up_validation_passes(config):
    """prepare_config + validate_config, the offline part of `ray up`, accept the file."""
    prepared = prepare_config(copy.deepcopy(config))

    validate_config(prepared)

    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_not_vacuous(config):
    """The same validation rejects a GPU fraction in a node type's resources (Ray wants integers)."""
    bad = copy.deepcopy(config)
    name = next(iter(_worker_types(bad)))
    bad["available_node_types"][name]["resources"]["GPU"] = 0.5

    with pytest.raises(jsonschema.ValidationError, match="integer"):
        validate_config(prepare_config(bad))


def test_has_gpu_worker_type_and_cpu_only_head(config):
    """A worker type offers at least one GPU and can scale; the head offers none, so GPU sites avoid it."""
    workers = _worker_types(config)
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}

    assert gpu_types, f"no worker type with a GPU in {list(workers)}"
    for name, node in gpu_types.items():
        assert node["resources"].get("CPU", 0) >= 1, name
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= config["max_workers"], name
        assert node["max_workers"] >= 1, name
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def test_setup_installs_mounted_fl_ray(config):
    """setup_commands pip-install fl_ray from the folder that file_mounts fills from this repository."""
    setup = _commands(config, "setup_commands")
    match = re.search(r"pip install\b[^\n]*?-e\s+(\S+)", setup)

    assert match, f"no editable pip install of fl_ray in setup_commands: {setup!r}"
    target = match.group(1).rstrip("/")
    mounted = {remote.rstrip("/"): local for remote, local in config["file_mounts"].items()}
    for part in ("fl_ray", "setup.cfg", "pyproject.toml"):
        remote = f"{target}/{part}"
        assert remote in mounted, f"{remote} is not in file_mounts, so `pip install -e {target}` fails"
        assert (REPO / mounted[remote]).exists(), f"file_mounts source {mounted[remote]} is not in the repo"
    assert f"{target}/scripts" in mounted and f"{target}/configs" in mounted


def test_file_mounts_sources_exist_in_repo(config):
    """Every relative file_mounts source exists relative to the repository root, where `ray up` runs."""
    relative = [local for local in config["file_mounts"].values() if not local.startswith(("~", "/"))]

    assert relative
    missing = [local for local in relative if not (REPO / local).exists()]
    assert not missing


def test_token_auth_is_shared_and_required(config):
    """Every node gets the local Ray auth token, and `ray start` runs with RAY_AUTH_MODE=token."""
    head, worker = _commands(config, "head_start_ray_commands"), _commands(config, "worker_start_ray_commands")

    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "ray start --head" in head
    port = re.search(r"ray start --head[^\n]*--port=(\d+)", head).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker


def test_image_ray_version_matches_installed_ray(config):
    """The image runs the Ray installed here: the launcher and the cluster must have the same version."""
    image = config["docker"]["image"]

    tag = image.rpartition(":")[2]
    assert tag.split("-")[0] == ray.__version__, f"{image} vs ray {ray.__version__}"
    assert "gpu" in tag
