"""The datasets of `xentlab.lab.datasets` as in-memory LightningDataModules: splits scaled on the training
split only (rows per feature, images per channel), optional label noise and image augmentation, batches that
are slices of whole tensors (no per-item `__getitem__` + collate).
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.preprocessing import StandardScaler

from xentlab.lab.datasets import (
    GIVEN_SPLITS,
    SPLITS,
    balanced_eval_splits,
    check_positive_int,
    check_sampler,
    check_settings,
    dataset,
    split,
)
from xentlab.tasks import check_task

log = logging.getLogger(__name__)


# --- scaling, noise, sampling -------------------------------------------------------------------------

def standardize(splits: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """z = (x - mean_train) / std_train per feature, the statistics from the training split only.

    Returns float32 features (of each row's own shape) and int64 class indices (or float32 multi-hot rows).
    """
    scaler = StandardScaler().fit(splits["train"][0].reshape(len(splits["train"][0]), -1))
    return {name: (torch.tensor(scaler.transform(x.reshape(len(x), -1)).reshape(x.shape),
                                dtype=torch.float32), labels(y))
            for name, (x, y) in splits.items()}


def labels(y) -> torch.Tensor:
    """Class indices as int64, multi-hot rows as float32."""
    return torch.tensor(y, dtype=torch.long if y.ndim == 1 else torch.float32)


# --- images ---------------------------------------------------------------------------------------------

def channel_statistics(x: torch.Tensor, chunk: int = 2048) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of images (N, C, H, W), pixels scaled to [0, 1] if uint8."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = to_unit(x[start:start + chunk]).double()
        total += part.sum((0, 2, 3))
        squares += part.square().sum((0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    return mean.tolist(), (squares / count - mean.square()).clamp_min(1e-12).sqrt().tolist()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images as float32, uint8 pixels divided by 255."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch (B, C, H, W), each image its own draw: a random H x W
    crop of the image zero-padded by `padding` pixels on every side, then a horizontal flip with
    probability 1/2 (torchvision's RandomCrop(padding=p) then RandomHorizontalFlip)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy, dx = (torch.randint(0, 2 * padding + 1, (b,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    crops = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class ImageTransform:
    """Turns a batch of stored images into the model's input: float pixels (uint8 / 255), the optional
    crop-and-flip augmentation (training only), then (x - mean_c) / std_c per channel."""

    def __init__(self, mean: list[float], std: list[float], augment: bool = False, crop_padding: int = 4):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment, self.crop_padding = augment, crop_padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_unit(x)
        if self.augment:
            x = crop_flip(x, self.crop_padding, generator)
        return (x - self.mean) / self.std


def image_splits(splits: dict, mean, std, augment: bool, crop_padding: int) -> tuple[dict, dict]:
    """Images kept as stored (uint8 stays uint8: a quarter of float32's memory) and one ImageTransform per
    split; `mean`/`std` None are the training split's per-channel statistics."""
    tensors = {name: (torch.tensor(x), labels(y)) for name, (x, y) in splits.items()}
    channels = tensors["train"][0].shape[1]
    if mean is None or std is None:
        measured = channel_statistics(tensors["train"][0])
        mean, std = measured[0] if mean is None else mean, measured[1] if std is None else std
    for key, value in (("mean", mean), ("std", std)):
        if len(value) != channels:
            raise ValueError(f"data.{key} needs one value per channel ({channels}), got {list(value)}")
    transforms = {name: ImageTransform(list(mean), list(std), augment and name == "train", crop_padding)
                  for name in splits}
    return tensors, transforms


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
                 sampler: str = "instance", transforms: dict | None = None):
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
        # One sample's shape: (features,) for rows, (channels, height, width) for images.
        self.input_shape = tuple(splits["train"][0].shape[1:])
        self.num_features = int(np.prod(self.input_shape))
        # Per split, what turns a stored batch into the model's input (images: scaling, augmentation).
        self.transforms = dict(transforms or {})
        # The training batches' randomness (order, re-sampling, augmentation), one stream over the epochs:
        # its state is part of a checkpoint, so a resumed run draws the epochs an uninterrupted one draws.
        self.train_generator = torch.Generator().manual_seed(seed)

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

    def _batches(self, split_name: str, batch_size: int, shuffle: bool, weights: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        x, y = self.splits[split_name]
        # Under DDP each process takes its own shard; alone (or without a trainer) it takes everything.
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TensorBatches(x, y, batch_size, shuffle, self.seed, rank=rank, world_size=world_size,
                             weights=weights, transform=self.transforms.get(split_name), generator=generator)

    def train_dataloader(self):
        return self._batches("train", self.batch_size, shuffle=True, weights=self.train_weights,
                             generator=self.train_generator)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the data: the training stream's position (`train_generator`)."""
        return {"train_generator": self.train_generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_generator" in state_dict:  # checkpoints from before it was kept lack it
            self.train_generator.set_state(state_dict["train_generator"])

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
    WeightedRandomSampler does; seeded, so every process draws the same sequence. `transform(x, generator)`,
    if given, maps each batch's x (e.g. `ImageTransform`), drawing any randomness from the same generator:
    `generator`, or else one of its own seeded with `seed`.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int, *,
                 rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None, transform=None,
                 generator: torch.Generator | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if weights is not None and (weights.shape != (len(x),) or not shuffle):
            raise ValueError(f"weights must be one per sample ({len(x)}) and only for a shuffled (training) "
                             f"split, got shape {tuple(weights.shape)} with shuffle={shuffle}")
        self.x, self.y, self.batch_size, self.shuffle, self.weights = x, y, batch_size, shuffle, weights
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

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
            batch = x[start:start + self.batch_size]
            if self.transform is not None:
                batch = self.transform(batch, self.generator)
            yield batch, y[start:start + self.batch_size]


def build_datamodule(name: str | None = None, *, seed: int = 0, val_fraction: float = 0.2,
                     test_fraction: float = 0.2, eval_split: str = "natural", sampler: str = "instance",
                     batch_size: int = 128, eval_batch_size: int | None = None, label_noise: float = 0.0,
                     augment: bool = False, crop_padding: int = 4, mean: list[float] | None = None,
                     std: list[float] | None = None, _target_: str | None = None,
                     **params) -> TensorDataModule:
    """The dataset `name` (a key of DATASETS; or the factory at `_target_`) built with `params`, split,
    scaled and batched.

    `eval_split` is `natural` (a stratified split: val and test imbalanced like train) or `balanced`
    (train long-tailed, val and test with equal numbers per class; `balanced_eval_splits`); data that comes
    split (CIFAR-LT, a factory's own splits) keeps its val and test splits. `sampler` draws training
    batches: `instance` (each sample once per epoch), `class_balanced` or `sqrt` (re-sampling by class,
    `sampling_weights`).

    Rows are standardised per feature on the training split (`standardize`). Images (N, C, H, W) are
    kept as stored and scaled per batch (`ImageTransform`): per channel by `mean`/`std` (None: the
    training split's), after the crop-and-flip augmentation on training batches when `augment`.

    Training batches hold `batch_size` samples; validation and test batches `eval_batch_size` (default:
    the same). `label_noise` > 0 flips that fraction of the *training* labels to another class
    (`flip_labels`); val and test stay clean, and `class_counts` reports the noisy training counts.
    """
    task = check_settings(name, val_fraction=val_fraction, test_fraction=test_fraction, eval_split=eval_split,
                          sampler=sampler, batch_size=batch_size, eval_batch_size=eval_batch_size,
                          label_noise=label_noise, augment=augment, crop_padding=crop_padding, mean=mean,
                          std=std, _target_=_target_, **params)
    make = dataset(name, _target_)[0]
    if eval_split == "balanced" and name not in GIVEN_SPLITS:
        raw = balanced_eval_splits(make, params, val_fraction, test_fraction, seed)
    else:
        data = make(seed=seed, **params)
        raw = data if isinstance(data, dict) else split(*data, val_fraction, test_fraction, seed)
    y = raw["train"][1]
    num_classes = int(y.shape[1]) if y.ndim == 2 else int(max(s[1].max() for s in raw.values())) + 1
    task = task or ("multilabel" if y.ndim == 2 else "binary" if num_classes == 2 else "multiclass")
    if raw["train"][0].ndim == 4:
        splits, transforms = image_splits(raw, mean, std, augment, crop_padding)
    elif augment:
        raise ValueError("data.augment crops and flips images (N, C, H, W); this data has rows of shape "
                         f"{raw['train'][0].shape[1:]}: set data.augment=false")
    else:
        splits, transforms = standardize(raw), None
    if label_noise:
        x_train, y_train = splits["train"]
        splits["train"] = (x_train, flip_labels(y_train, label_noise, num_classes, seed))
    check_splits(splits, task, num_classes)
    return TensorDataModule(splits, task, num_classes, batch_size=batch_size, seed=seed,
                            name=name or _target_, eval_batch_size=eval_batch_size, sampler=sampler,
                            transforms=transforms)


def log_counts(datamodule: TensorDataModule) -> None:
    """The class-count table (`describe`) on this module's logger at INFO, by `xentlab.lab.run.build_parts`
    once the loss and model are built too: a run refused while building shows its refusal alone."""
    log.info("%s", datamodule.describe())
