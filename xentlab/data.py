"""Datasets as in-memory LightningDataModules: scikit-learn generators with controlled class imbalance."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

TASKS = ("multiclass", "multilabel", "binary")


def long_tail_counts(n_max: int, n_classes: int, imbalance_ratio: float, profile: str = "exponential") -> list[int]:
    """Per-class sample counts with majority:minority = `imbalance_ratio`.

    exponential: n_c = n_max * rho^(-c/(C-1)) (the long-tailed-benchmark profile);
    step: the first half of the classes get n_max, the rest n_max / rho.
    """
    if imbalance_ratio < 1:
        raise ValueError(f"data.imbalance_ratio must be >= 1 (majority:minority), got {imbalance_ratio}")
    if profile == "exponential":
        exponents = np.arange(n_classes) / max(n_classes - 1, 1)
        counts = n_max * float(imbalance_ratio) ** (-exponents)
    elif profile == "step":
        counts = np.where(np.arange(n_classes) < (n_classes + 1) // 2, n_max, n_max / imbalance_ratio)
    else:
        raise ValueError(f"data.profile must be 'exponential' or 'step', got {profile!r}")
    return [int(round(c)) for c in counts]


class TensorDataModule(pl.LightningDataModule):
    """Train/val/test splits held as tensors; batches are slices of a shuffled index, no per-item collate."""

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], task: str, num_classes: int,
                 batch_size: int = 128, seed: int = 0):
        super().__init__()
        self.splits, self.task, self.num_classes = splits, task, num_classes
        self.batch_size, self.seed = batch_size, seed
        self.num_features = splits["train"][0].shape[1]

    @property
    def class_counts(self) -> torch.Tensor:
        """Training-split count per class (positives per label for multilabel data)."""
        y = self.splits["train"][1]
        if self.task == "multilabel":
            return y.sum(0).long()
        return torch.bincount(y, minlength=self.num_classes)

    def _batches(self, split: str, shuffle: bool):
        x, y = self.splits[split]
        return TensorBatches(x, y, self.batch_size, shuffle, self.seed)

    def train_dataloader(self):
        return self._batches("train", shuffle=True)

    def val_dataloader(self):
        return self._batches("val", shuffle=False)

    def test_dataloader(self):
        return self._batches("test", shuffle=False)


class TensorBatches:
    """Iterable of (x, y) mini-batches sliced from whole tensors; reshuffled every epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.generator) if self.shuffle else None
        for start in range(0, len(self.x), self.batch_size):
            if order is None:
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            else:
                index = order[start:start + self.batch_size]
                yield self.x[index], self.y[index]


def split_and_scale(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Stratified train/val/test split; the scaler is fitted on the training split only."""
    stratify = y if y.ndim == 1 else None
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=stratify, random_state=seed)
    stratify = y_rest if y.ndim == 1 else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), stratify=stratify, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    target_dtype = torch.long if y.ndim == 1 else torch.float32
    return {
        name: (torch.tensor(scaler.transform(xs), dtype=torch.float32), torch.tensor(ys, dtype=target_dtype))
        for name, xs, ys in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }


def classification(n_samples: int = 3000, n_features: int = 20, n_informative: int = 10, n_classes: int = 5,
                   class_sep: float = 1.0, imbalance_ratio: float = 10.0, profile: str = "exponential",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """make_classification, then per-class subsampling to an exact long-tail profile.

    n_max is chosen so the counts sum to about `n_samples`; no labels are flipped (sklearn's flip_y
    would silently change the class proportions).
    """
    if n_samples < 1:
        raise ValueError(f"data.n_samples must be a positive integer, got {n_samples}")
    shares = long_tail_counts(10**6, n_classes, imbalance_ratio, profile)
    counts = [max(1, round(n_samples * s / sum(shares))) for s in shares]
    x, y = make_classification(n_samples=max(counts) * n_classes, n_features=n_features,
                               n_informative=n_informative, n_redundant=0, n_classes=n_classes,
                               class_sep=class_sep, flip_y=0.0, weights=None, random_state=seed)
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(y == c), size=n, replace=False) for c, n in enumerate(counts)])
    return x[keep], y[keep]


DATASETS = {"classification": (classification, "multiclass")}


def build_datamodule(name: str, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                     batch_size: int = 128, **params) -> TensorDataModule:
    """The dataset `name` (a key of DATASETS) generated with `params`, split, scaled and batched."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    make, task = DATASETS[name]
    x, y = make(seed=seed, **params)
    splits = split_and_scale(x, y, val_fraction, test_fraction, seed)
    num_classes = int(y.shape[1]) if y.ndim == 2 else int(y.max()) + 1
    return TensorDataModule(splits, task, num_classes, batch_size=batch_size, seed=seed)
