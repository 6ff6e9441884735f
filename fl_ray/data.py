"""Datasets and how they are split across sites.

A dataset is a plug-in (see :mod:`fl_ray.plugins`): a :class:`DatasetSource` subclass named in the
config by a built-in name or an import path (``dataset.name: package.module:Class``), built with
``dataset.args``, whose ``load`` returns NumPy arrays in NCHW layout. Three are built in: ``digits``
(scikit-learn's bundled 8x8 digits, offline), ``cifar10`` (torchvision's CIFAR10 read from
``dataset.root``, uint8; run ``scripts/prepare_data.py`` once to download it) and ``synthetic`` (seeded
Gaussian blobs of ``dataset.shape``). The training split is partitioned across sites IID or by a Dirichlet(alpha) label skew;
every sample goes to exactly one site. A dataset that cannot be loaded or split raises
:class:`DatasetError` naming the config field; the job turns it into a config error before Ray starts.
"""

from __future__ import annotations

import gzip
import importlib.util
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_ray.config import DatasetConfig
from fl_ray.plugins import build_plugin


class DatasetError(ValueError):
    """A dataset that cannot be loaded or split as configured; the message names the field and the value."""


@dataclass(frozen=True)
class ArrayData:
    """Inputs ``x`` (N, C, H, W) and integer labels ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayData:
        """The samples at ``indices``."""
        return ArrayData(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class Dataset:
    """A training split (to partition across sites) and a held-out test split (for the server)."""

    train: ArrayData
    test: ArrayData
    num_classes: int
    input_shape: tuple[int, ...]


class DatasetSource(ABC):
    """The dataset contract: ``load`` gives the training and test splits; built with ``dataset.args``.

    ``load`` gets the whole ``dataset`` section (``root``, ``test_fraction``, ``num_samples``, ...) and
    the job's seed, and runs on every site and the server, so it must give the same arrays each time.
    """

    @abstractmethod
    def load(self, cfg: DatasetConfig, seed: int) -> Dataset:
        """The dataset, split into a training part (shared out across sites) and a test part (the server's)."""


def load_dataset(cfg: DatasetConfig, seed: int) -> Dataset:
    """Load the dataset ``cfg.name`` names; DatasetError (or PluginError) names the bad field."""
    source: DatasetSource = build_plugin("dataset", cfg.name, dict(cfg.args), "dataset.name", "dataset.args")
    return source.load(cfg, seed)


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, num_classes: int) -> Dataset:
    """A seeded random ``test_fraction`` of the samples as the test split, the rest as the training split."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(ArrayData(x[train], y[train]), ArrayData(x[test], y[test]), num_classes, tuple(x.shape[1:]))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) with values 0-16, and labels. Read straight from the
    file scikit-learn ships, without importing scikit-learn (seconds of CPU in every site), when it is
    where scikit-learn keeps it; else through ``sklearn.datasets.load_digits``."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


class Digits(DatasetSource):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), scaled to [0, 1]; no download."""

    def load(self, cfg: DatasetConfig, seed: int) -> Dataset:
        images, labels = digits_arrays()
        x = (images.astype(np.float32) / 16.0)[:, None, :, :]
        return split(x, labels, cfg.test_fraction, seed, 10)


class Synthetic(DatasetSource):
    """``dataset.num_samples`` seeded Gaussian blobs of ``dataset.shape`` around one centre per class."""

    def __init__(self, num_classes: int = 10) -> None:
        self.num_classes = num_classes

    def load(self, cfg: DatasetConfig, seed: int) -> Dataset:
        rng = np.random.default_rng(seed)
        shape = tuple(cfg.shape)
        centers = rng.normal(0.0, 1.0, size=(self.num_classes, *shape)).astype(np.float32)
        y = rng.integers(0, self.num_classes, size=cfg.num_samples)
        x = centers[y] + rng.normal(0.0, 0.7, size=(cfg.num_samples, *shape)).astype(np.float32)
        return split(x.astype(np.float32), y.astype(np.int64), cfg.test_fraction, seed, self.num_classes)


class Cifar10(DatasetSource):
    """torchvision's CIFAR-10 (uint8 32x32 RGB, its own train/test split) from ``dataset.root``."""

    def load(self, cfg: DatasetConfig, seed: int) -> Dataset:
        from torchvision.datasets import CIFAR10

        if not cfg.root:
            raise DatasetError("dataset.root: cifar10 needs the folder that holds it (see scripts/prepare_data.py)")
        root = Path(cfg.root).expanduser()
        try:
            train = CIFAR10(str(root), train=True, download=False)
            test = CIFAR10(str(root), train=False, download=False)
        except RuntimeError:  # torchvision's message advises download=True, which a job config cannot set
            raise DatasetError(
                f"dataset.root: CIFAR-10 is not in {str(root)!r} (or is incomplete); download it there once with "
                f"`{sys.executable} {Path(__file__).resolve().parent.parent / 'scripts' / 'prepare_data.py'} "
                f"--root {root}`, or set dataset.root to where it is"
            ) from None

        def arrays(ds: CIFAR10) -> ArrayData:
            return ArrayData(
                np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)
            )

        train_data = arrays(train)
        return Dataset(train_data, arrays(test), 10, tuple(train_data.x.shape[1:]))


def partition_iid(num_samples: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal the samples into ``num_sites`` near-equal parts."""
    if num_samples < num_sites:
        raise DatasetError(f"sites: {num_sites} sites but only {num_samples} training samples to share")
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_sites)]


def partition_dirichlet(
    labels: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator, min_size: int = 2, max_tries: int = 100
) -> list[np.ndarray]:
    """Split by label skew: each class is shared out by proportions drawn from Dirichlet(alpha).

    Draws again (up to ``max_tries``) until every site has at least ``min_size`` samples.
    """
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites))[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DatasetError(
        f"dataset.alpha: {alpha} is so skewed that some of the {num_sites} sites got fewer than "
        f"{min_size} samples in {max_tries} draws; raise alpha or use fewer sites"
    )


def partition(cfg: DatasetConfig, labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Partition the training labels as ``cfg.partition`` says, seeded."""
    rng = np.random.default_rng(seed)
    if cfg.partition == "iid":
        return partition_iid(len(labels), num_sites, rng)
    return partition_dirichlet(labels, num_sites, cfg.alpha, rng)


def site_data(cfg: DatasetConfig, seed: int, num_sites: int, site_index: int | None) -> tuple[ArrayData, Dataset]:
    """What one site trains on (its partition of the training split), or the test split when
    ``site_index`` is None (the server), with the dataset it came from.

    Every site loads and partitions the data itself, the same way from the same seed, so nothing
    large travels through Ray and a restarted site finds its data again.
    """
    dataset = load_dataset(cfg, seed)
    if site_index is None:
        return dataset.test, dataset
    return dataset.train.subset(partition(cfg, dataset.train.y, num_sites, seed)[site_index]), dataset
