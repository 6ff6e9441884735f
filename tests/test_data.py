"""Datasets and partitioning, including CIFAR-10 read by torchvision from a tiny CIFAR-format folder."""

import hashlib
import pickle

import numpy as np
import pytest

from fl_ray.config import ConfigError, DatasetConfig, parse_config
from fl_ray.data import (
    DatasetError,
    DatasetSource,
    load_dataset,
    partition,
    partition_dirichlet,
    partition_iid,
    site_data,
    split,
)
from fl_ray.plugins import PluginError


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_iid_partition_covers_every_sample_once_and_is_seeded():
    """IID: every sample at exactly one site, near-equal sizes, same seed same split."""
    parts = partition_iid(1001, 4, np.random.default_rng(3))
    _assert_exact_cover(parts, 1001)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = partition_iid(1001, 4, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_partition_covers_every_sample_once_and_skews_labels():
    """Dirichlet(0.1): exact cover, and label mixes far from uniform (vs. alpha=1000, near uniform)."""
    labels = np.random.default_rng(0).integers(0, 10, size=3000)
    skewed = partition_dirichlet(labels, 5, 0.1, np.random.default_rng(1))
    even = partition_dirichlet(labels, 5, 1000.0, np.random.default_rng(1))
    _assert_exact_cover(skewed, 3000)
    _assert_exact_cover(even, 3000)

    def max_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert max_share(skewed) > 0.4 > 0.15 > max_share(even)


def test_too_many_sites_for_the_data_is_a_config_error():
    """More sites than samples cannot be split."""
    with pytest.raises(DatasetError, match="sites"):
        partition_iid(3, 5, np.random.default_rng(0))


def test_digits_is_offline_and_split_into_train_and_test():
    """digits: scikit-learn's bundled data, 1x8x8 float inputs in [0, 1], a held-out test split."""
    ds = load_dataset(DatasetConfig(name="digits", test_fraction=0.2), seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train) + len(ds.test) == 1797
    assert len(ds.test) == round(1797 * 0.2)
    assert ds.train.x.dtype == np.float32 and 0.0 <= ds.train.x.min() and ds.train.x.max() <= 1.0


def test_site_data_is_the_sites_partition():
    """A site's data is its own partition; the server's is the test split."""
    cfg = DatasetConfig(name="synthetic", num_samples=500)
    ds = load_dataset(cfg, 5)
    parts = partition(cfg, ds.train.y, 3, 5)
    mine, _ = site_data(cfg, 5, 3, 1)
    assert np.array_equal(mine.y, ds.train.y[parts[1]])
    test, _ = site_data(cfg, 5, 3, None)
    assert np.array_equal(test.x, ds.test.x)


def _write_tiny_cifar(root, n_per_batch=6):
    """Write a CIFAR-10-python folder of 5 train batches and a test batch, and return the files' md5s."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n_per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    md5["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    return md5


def test_cifar10_is_read_through_torchvision(tmp_path, monkeypatch):
    """torchvision's CIFAR10 reads a tiny CIFAR-format folder; images come out uint8 NCHW with labels.

    The test registers its own files' checksums with torchvision (the real ones are for the real
    dataset); everything else is torchvision's loading code.
    """
    from torchvision.datasets import CIFAR10

    md5 = _write_tiny_cifar(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})

    ds = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)), seed=0)

    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train) == 30 and len(ds.test) == 6
    assert ds.train.x.dtype == np.uint8
    first = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert np.array_equal(ds.train.x[0], first["data"][0].reshape(3, 32, 32))
    assert ds.train.y[0] == first["labels"][0]


def test_missing_cifar10_says_to_run_prepare_data(tmp_path):
    """No CIFAR-10 under the root: a clear error giving the prepare_data.py command line for that root, and not
    torchvision's advice to pass download=True, which a job config cannot."""
    with pytest.raises(DatasetError, match="prepare_data.py") as err:
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path / "nothing")), seed=0)
    assert f"--root {tmp_path / 'nothing'}" in str(err.value) and "download=True" not in str(err.value)


def test_digits_are_scikit_learns_without_importing_it():
    """The digits read straight from scikit-learn's file equal load_digits(), and the read imports no sklearn."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from fl_ray.data import digits_arrays

    images, labels = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    code = "import sys; from fl_ray.data import digits_arrays; digits_arrays(); print('sklearn' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_synthetic_data_takes_the_configured_shape():
    """dataset.shape sets a synthetic sample's (C, H, W), e.g. CIFAR-sized inputs for the hello-pt CNN."""
    ds = load_dataset(DatasetConfig(name="synthetic", num_samples=50, shape=(3, 32, 32)), seed=0)
    assert ds.input_shape == (3, 32, 32) and ds.train.x.shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="at least 1"):
        DatasetConfig(name="synthetic", shape=(3, 0, 32))


class Stripes(DatasetSource):
    """A user's dataset: ``n`` 1x4x4 images of horizontal (label 0) or vertical (label 1) stripes."""

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def load(self, cfg, seed):
        y = np.arange(self.n) % 2
        x = np.zeros((self.n, 1, 4, 4), np.float32)
        x[y == 0, :, ::2, :] = 1.0
        x[y == 1, :, :, ::2] = 1.0
        return split(x, y.astype(np.int64), cfg.test_fraction, seed, 2)


def test_a_dataset_is_chosen_by_import_path_with_its_arguments():
    """dataset.name: package.module:Class builds the user's DatasetSource with dataset.args, as a learner is."""
    cfg = parse_config({"dataset": {"name": "test_data:Stripes", "args": {"n": 50}, "test_fraction": 0.2}})
    ds = load_dataset(cfg.dataset, seed=0)
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.input_shape) == (40, 10, 2, (1, 4, 4))


@pytest.mark.parametrize(
    "dataset, message",
    [
        ({"name": "test_data:split"}, r"dataset.name: expected a subclass of fl_ray.data.DatasetSource"),
        (
            {"name": "test_data:Stripes", "args": {"size": 3}},
            r"dataset.args.size: unknown argument \(got 3\); "
            r"test_data:Stripes takes n",
        ),
        ({"name": "no_such_module:X"}, r"dataset.name: cannot import module 'no_such_module'"),
    ],
)
def test_a_bad_dataset_plugin_names_the_field(dataset, message):
    """A path to something that is not a DatasetSource, or an argument it does not take, is a PluginError
    naming the field; an unknown built-in name is refused by the config itself."""
    with pytest.raises(PluginError, match=message):
        load_dataset(parse_config({"dataset": dataset}).dataset, seed=0)
    with pytest.raises(
        ConfigError,
        match=r"dataset.name: expected one of digits, cifar10, synthetic or an import "
        r"path .*, got 'mnist'",
    ):
        parse_config({"dataset": {"name": "mnist"}})
