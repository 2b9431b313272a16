"""The datasets of `xentlab.lab.datasets` as in-memory LightningDataModules: splits scaled on the training
split only, optional label noise, batches that are slices of whole tensors (no per-item `__getitem__` +
collate).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from sklearn.preprocessing import StandardScaler

from xentlab.lab.datasets import (
    DATASETS,
    SPLITS,
    balanced_eval_splits,
    check_positive_int,
    check_sampler,
    check_settings,
    split,
)
from xentlab.tasks import check_task

log = logging.getLogger(__name__)


# --- scaling, noise, sampling -------------------------------------------------------------------------

def standardize(splits: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """z = (x - mean_train) / std_train per feature, the statistics from the training split only.

    Returns float32 features and int64 class indices (or float32 multi-hot rows).
    """
    scaler = StandardScaler().fit(splits["train"][0])
    return {name: (torch.tensor(scaler.transform(x), dtype=torch.float32),
                   torch.tensor(y, dtype=torch.long if y.ndim == 1 else torch.float32))
            for name, (x, y) in splits.items()}


def flip_labels(y: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of `y` with exactly round(fraction * N) labels, chosen uniformly, moved to a uniformly
    drawn *different* class (symmetric label noise)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.label_noise must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(y), generator=generator)[:round(fraction * len(y))]
    shift = torch.randint(1, num_classes, (len(rows),), generator=generator)
    noisy = y.clone()
    noisy[rows] = (y[rows] + shift) % num_classes
    return noisy


def label_counts(y: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    """Samples per class (positives per label for multilabel data), int64, one per class."""
    return y.sum(0).long() if task == "multilabel" else torch.bincount(y, minlength=num_classes)


def check_splits(splits: dict, task: str, num_classes: int) -> None:
    """Every class (label: positive and negative) must occur in every split, or metrics and weights break."""
    for name, (_, y) in splits.items():
        counts = label_counts(y, task, num_classes)
        present = (counts > 0) & (counts < len(y)) if task == "multilabel" else counts > 0
        if not present.all():
            missing = torch.nonzero(~present).flatten().tolist()
            kind = "labels" if task == "multilabel" else "classes"
            raise ValueError(f"the {name} split lacks samples of {kind} {missing} (or has only positives); "
                             "use more samples, a lower imbalance_ratio or larger split fractions")


def sampling_weights(y: torch.Tensor, sampler: str, num_classes: int) -> torch.Tensor | None:
    """Per-sample weights w_i for drawing training batches, or None for plain shuffling (`instance`).

    A sample of class c is drawn with probability proportional to w = p_c / n_c, n_c the class's count:
    `class_balanced` p_c = 1/C (every class equally likely), `sqrt` p_c proportional to sqrt(n_c)
    (square-root re-sampling, between instance and class-balanced sampling).
    """
    check_sampler(sampler, "multilabel" if y.ndim == 2 else "multiclass")
    if sampler == "instance":
        return None
    counts = torch.bincount(y, minlength=num_classes).double()
    per_class = 1.0 / counts if sampler == "class_balanced" else counts.rsqrt()
    return per_class[y]


# --- the LightningDataModule ---------------------------------------------------------------------------

class TensorDataModule(pl.LightningDataModule):
    """Train/val/test splits held as tensors; batches are slices of a shuffled index, no per-item collate."""

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], task: str, num_classes: int,
                 batch_size: int = 128, seed: int = 0, name: str = "", eval_batch_size: int | None = None,
                 sampler: str = "instance"):
        super().__init__()
        check_task(task)
        # Checked (and computed) here, before training starts.
        self.train_weights = sampling_weights(splits["train"][1], sampler, num_classes)
        self.sampler = sampler
        eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        self.splits, self.task, self.num_classes, self.name = splits, task, num_classes, name
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.num_features = splits["train"][0].shape[1]

    def counts(self, split: str) -> torch.Tensor:
        """Samples per class in `split` (positives per label for multilabel data), int64, one per class."""
        return label_counts(self.splits[split][1], self.task, self.num_classes)

    @property
    def class_counts(self) -> torch.Tensor:
        """Training-split count per class (positives per label for multilabel data)."""
        return self.counts("train")

    def describe(self) -> str:
        """A small table: samples per class (positives per label) in each split."""
        head = "label" if self.task == "multilabel" else "class"
        rows = [f"{self.name or 'data'} ({self.task}), {head} counts per split:",
                f"  {'split':<6}{'n':>7}  " + " ".join(f"{c:>6}" for c in range(self.num_classes))]
        for split_name in SPLITS:
            rows.append(f"  {split_name:<6}{len(self.splits[split_name][1]):>7}  "
                        + " ".join(f"{n:>6}" for n in self.counts(split_name).tolist()))
        return "\n".join(rows)

    def _batches(self, split_name: str, batch_size: int, shuffle: bool, weights: torch.Tensor | None = None):
        x, y = self.splits[split_name]
        # Under DDP each process takes its own shard; alone (or without a trainer) it takes everything.
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TensorBatches(x, y, batch_size, shuffle, self.seed, rank=rank, world_size=world_size,
                             weights=weights)

    def train_dataloader(self):
        return self._batches("train", self.batch_size, shuffle=True, weights=self.train_weights)

    def val_dataloader(self):
        return self._batches("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._batches("test", self.eval_batch_size, shuffle=False)


class TensorBatches:
    """Iterable of (x, y) mini-batches sliced from whole tensors; reshuffled every epoch.

    With `world_size` > 1 it yields shard `rank` only: samples rank, rank + world_size, ... of the
    (shuffled) order, padded by wrapping around to a multiple of `world_size` as torch's
    DistributedSampler does, so every process runs the same number of batches. The processes draw the
    same permutation (same seed), so the shards are disjoint apart from that padding of at most
    world_size - 1 samples. With per-sample `weights` (re-sampling, `sampling_weights`), each epoch is
    instead len(x) draws with replacement, sample i drawn with probability w_i / sum(w), as torch's
    WeightedRandomSampler does; seeded, so every process draws the same sequence.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int, *,
                 rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if weights is not None and (weights.shape != (len(x),) or not shuffle):
            raise ValueError(f"weights must be one per sample ({len(x)}) and only for a shuffled (training) "
                             f"split, got shape {tuple(weights.shape)} with shuffle={shuffle}")
        self.x, self.y, self.batch_size, self.shuffle, self.weights = x, y, batch_size, shuffle, weights
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        per_process = -(-len(self.x) // self.world_size)
        return -(-per_process // self.batch_size)

    def __iter__(self):
        if self.shuffle or self.world_size > 1:
            # One gather per epoch, then views: no per-sample Python work on the hot path.
            if self.weights is not None:
                order = torch.multinomial(self.weights, len(self.x), replacement=True,
                                          generator=self.generator)
            elif self.shuffle:
                order = torch.randperm(len(self.x), generator=self.generator)
            else:
                order = torch.arange(len(self.x))
            if self.world_size > 1:
                padded = -(-len(order) // self.world_size) * self.world_size
                order = order.repeat(-(-padded // len(order)))[:padded][self.rank::self.world_size]
            x, y = self.x[order], self.y[order]
        else:
            x, y = self.x, self.y
        for start in range(0, len(x), self.batch_size):
            yield x[start:start + self.batch_size], y[start:start + self.batch_size]


def build_datamodule(name: str, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                     eval_split: str = "natural", sampler: str = "instance", batch_size: int = 128,
                     eval_batch_size: int | None = None, label_noise: float = 0.0,
                     **params) -> TensorDataModule:
    """The dataset `name` (a key of DATASETS) generated with `params`, split, scaled and batched.

    `eval_split` is `natural` (a stratified split: val and test imbalanced like train) or `balanced`
    (train long-tailed, val and test with equal numbers per class; `balanced_eval_splits`). `sampler`
    draws training batches: `instance` (each sample once per epoch), `class_balanced` or `sqrt`
    (re-sampling by class, `sampling_weights`).

    Training batches hold `batch_size` samples; validation and test batches `eval_batch_size` (default:
    the same). `label_noise` > 0 flips that fraction of the *training* labels to another class
    (`flip_labels`); val and test stay clean, and `class_counts` reports the noisy training counts.
    """
    task = check_settings(name, val_fraction=val_fraction, test_fraction=test_fraction, eval_split=eval_split,
                          sampler=sampler, batch_size=batch_size, eval_batch_size=eval_batch_size,
                          label_noise=label_noise, **params)
    make = DATASETS[name][0]
    if eval_split == "balanced":
        raw = balanced_eval_splits(make, params, val_fraction, test_fraction, seed)
    else:
        raw = split(*make(seed=seed, **params), val_fraction, test_fraction, seed)
    y = raw["train"][1]
    num_classes = int(y.shape[1]) if y.ndim == 2 else int(max(s[1].max() for s in raw.values())) + 1
    splits = standardize(raw)
    if label_noise:
        x_train, y_train = splits["train"]
        splits["train"] = (x_train, flip_labels(y_train, label_noise, num_classes, seed))
    check_splits(splits, task, num_classes)
    return TensorDataModule(splits, task, num_classes, batch_size=batch_size, seed=seed, name=name,
                            eval_batch_size=eval_batch_size, sampler=sampler)


def log_counts(datamodule: TensorDataModule) -> None:
    """The class-count table (`describe`) on this module's logger at INFO, by `xentlab.lab.run.build_parts`
    once the loss and model are built too: a run refused while building shows its refusal alone."""
    log.info("%s", datamodule.describe())
