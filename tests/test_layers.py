"""Imports flow one way: each module of fl_ray (and each script) imports only from its own layer or
the layers below it. Read from the source with `ast`, so an import inside a function counts too."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Bottom to top. A module belongs to the first layer with a prefix that names it or a package above it.
LAYERS = [
    (
        "config and math",
        [
            "fl_ray.importing",
            "fl_ray.plugins",
            "fl_ray.config",
            "fl_ray.strictjson",
            "fl_ray.fedavg",
            "fl_ray.strategies",
            "fl_ray.model_names",
            "fl_ray.models",
            "fl_ray.data",
            "fl_ray.checkpoint",
            "fl_ray.progress",
            "fl_ray.mlflow_server",
            "fl_ray.mlflow_store",
            "fl_ray.viewers",
            "fl_ray.job_summary",
        ],
    ),
    (
        "tracking events and writers",
        [
            "fl_ray.tracking.events",
            "fl_ray.tracking.state",
            "fl_ray.tracking.sender",
            "fl_ray.tracking.writers",
            "fl_ray.tracking.site",
            "fl_ray.tracking.credentials",
            "fl_ray.metadata",
            "fl_ray.system_metrics",
            "fl_ray.tracking.mlflow_scope",
            "fl_ray.tracking.mlflow_plugin",
            "fl_ray.learners",
            "fl_ray.torch_learning",
            "fl_ray.client",
            "fl_ray.script_learner",
            "fl_ray.lightning",
            "fl_ray.rounds",
        ],
    ),
    ("hub and receivers", ["fl_ray.tracking.spool", "fl_ray.tracking.hub", "fl_ray.receivers"]),
    ("actors", ["fl_ray.actors"]),
    ("job and scripts", ["fl_ray.job", "fl_ray.replay", "fl_ray.cli", "fl_ray", "scripts"]),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def fl_ray_imports(path: Path, repo: Path) -> set[str]:
    """The fl_ray modules ``path`` imports (``from fl_ray.x import name`` imports fl_ray.x, or fl_ray.x.name
    when that is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "fl_ray" and _is_module(n, repo)}


def _is_module(name: str, repo: Path) -> bool:
    path = repo.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def upward_imports(repo: Path) -> list[str]:
    """Every import in ``repo``'s fl_ray/ and scripts/ that runs up the layers, described."""
    files = sorted((repo / "fl_ray").rglob("*.py")) + sorted((repo / "scripts").glob("*.py"))
    upward = []
    for path in files:
        module = module_name(path, repo)
        for imported in sorted(fl_ray_imports(path, repo)):
            if imported != "fl_ray" and layer_of(imported) > layer_of(module):
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
                )
    return upward


def test_every_import_flows_down_the_layers():
    """No module imports from a layer above its own (config and math < tracking events and writers < hub
    and receivers < actors < job and scripts), and the two actor kinds share start-up without importing
    each other."""
    assert upward_imports(REPO) == []
    for a, b in [("client", "server"), ("server", "client")]:
        assert f"fl_ray.actors.{b}" not in fl_ray_imports(REPO / "fl_ray" / "actors" / f"{a}.py", REPO)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: config importing the hub, even inside a function, is reported."""
    (tmp_path / "fl_ray" / "tracking").mkdir(parents=True)
    (tmp_path / "scripts").mkdir()
    for name in ("__init__.py", "tracking/__init__.py", "tracking/hub.py"):
        (tmp_path / "fl_ray" / name).write_text("")
    (tmp_path / "fl_ray" / "config.py").write_text("def f():\n    from fl_ray.tracking.hub import TrackingHub\n")
    assert upward_imports(tmp_path) == [
        "fl_ray.config (config and math) imports fl_ray.tracking.hub (hub and receivers)"
    ]
