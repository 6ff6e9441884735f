"""fl_ray runs from a non-editable install: the default job's config ships inside the package."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECK = """
import sys
from pathlib import Path
import fl_ray
from fl_ray.config import DEFAULT_CONFIG, load_config
from fl_ray.data import load_dataset
from fl_ray.learners import learner_class
assert Path(fl_ray.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), fl_ray.__file__
cfg = load_config()
assert DEFAULT_CONFIG.is_file() and cfg.name == "fedavg-digits", (DEFAULT_CONFIG, cfg.name)
learner_class(cfg.learner)
print(len(load_dataset(cfg.dataset, cfg.seed).train))
"""


@pytest.mark.slow
def test_the_default_job_loads_from_a_non_editable_install(tmp_path):
    """`pip install --no-deps` of the project into a fresh target, then, from another directory and
    without the repository on the path: fl_ray comes from the install, the default config loads, its
    learner and dataset are found."""
    source, target = tmp_path / "source", tmp_path / "site-packages"  # a copy: the build leaves files behind
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "workspace", "data", "tests"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert (target / "fl_ray" / "configs" / "default.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(target)!r}); exec(sys.stdin.read())",
            str(target),
        ],
        input=CHECK,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(1797 - round(1797 * 0.2))
