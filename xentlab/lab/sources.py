"""The user's own data as numpy arrays: tables (CSV, Parquet, npz), image folders, the official CIFAR
pickles, and any importable factory. Each reader returns features `x` (rows, or images as uint8
(N, C, H, W)) and labels `y` (class indices 0..C-1, or multi-hot rows), and refuses what it cannot read
with the setting to change. `xentlab.lab.datasets` applies the lab's protocol (long-tail profile, splits)
to what they return.

Nothing here imports torch or Lightning: pandas for tables, PIL (which matplotlib brings) for images,
the standard library for CIFAR's pickles and its download.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import logging
import pickle
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# Logged with the data's class-count table, and silenced with it after a sweep's first job.
log = logging.getLogger("xentlab.lab.data")

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".npz")
# torchvision's ImageFolder reads these (its IMG_EXTENSIONS), so a folder it reads is read here too.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --- labels -------------------------------------------------------------------------------------------

def encode_labels(values: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """Class indices for `values` and the class names: labels that are already 0..C-1 keep their value;
    anything else (strings, other integers) is mapped to the index of its rank among the sorted distinct
    labels, and the mapping is logged."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{source}: labels must be one per row, got an array of shape {values.shape}")
    if len(values) and _is_missing(values).any():
        raise ValueError(f"{source}: {int(_is_missing(values).sum())} row(s) have no label; drop them first")
    classes, indices = np.unique(values, return_inverse=True)
    names = [str(c) for c in classes]
    if not (np.issubdtype(values.dtype, np.integer) and np.array_equal(classes, np.arange(len(classes)))):
        log.info("%s: classes mapped to indices: %s", source,
                 ", ".join(f"{i}={name!r}" for i, name in enumerate(names)))
    return indices.astype(np.int64), names


def multi_hot(label_sets: Sequence[Sequence], source: str) -> tuple[np.ndarray, list[str]]:
    """Rows of label lists (e.g. ["cat", "dog"]) as multi-hot rows over the sorted distinct labels."""
    names = sorted({str(label) for labels in label_sets for label in labels})
    if len(names) < 2:
        raise ValueError(f"{source}: a multilabel target needs at least 2 distinct labels, got {names}")
    index = {name: i for i, name in enumerate(names)}
    y = np.zeros((len(label_sets), len(names)), dtype=np.int64)
    for row, labels in enumerate(label_sets):
        y[row, [index[str(label)] for label in labels]] = 1
    log.info("%s: labels mapped to columns: %s", source, ", ".join(f"{i}={n!r}" for i, n in enumerate(names)))
    return y, names


def _is_missing(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values])
    return np.zeros(len(values), dtype=bool)


# --- tables -------------------------------------------------------------------------------------------

def read_table(path: str, target: str | Sequence[str] | None = None, features: Sequence[str] | None = None,
               label_separator: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, labels and class names from a CSV/TSV, Parquet or `.npz` file.

    `target` is the label column; several columns (a list) are a multilabel target whose cells are 0/1;
    a column whose cells are lists of labels (Parquet), or strings joined by `label_separator` (CSV), is
    multilabel too. `features` are the columns to use (default: every other column), all numeric. An
    `.npz` file holds arrays `X` (rows) and `y` (labels, or multi-hot rows) and takes neither setting.
    """
    file = existing(path, "data.path", TABLE_SUFFIXES)
    if file.suffix == ".npz":
        return _read_npz(file, target, features)
    frame = _read_frame(file)
    source = file.name
    if target is None:
        raise ValueError(f"data.target must name the label column of {source}; its columns: "
                         f"{', '.join(map(str, frame.columns))}")
    targets = [target] if isinstance(target, str) else list(target)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    for column in targets + list(features or []):
        _check_column(column, columns, source)
    if len(targets) > 1:
        y, names = _multi_hot_columns(frame[targets], source), targets
    elif label_separator is not None or frame[targets[0]].map(_is_list).all():
        cells = frame[targets[0]]
        if cells.isna().any():
            raise ValueError(f"{source}: {int(cells.isna().sum())} row(s) of {targets[0]!r} have no labels")
        sets = [cell if _is_list(cell) else [s for s in str(cell).split(label_separator) if s]
                for cell in cells]
        y, names = multi_hot(sets, f"{source}:{targets[0]}")
    else:
        y, names = encode_labels(frame[targets[0]].to_numpy(), f"{source}:{targets[0]}")
    chosen = list(features) if features is not None else [c for c in columns if c not in targets]
    if not chosen:
        raise ValueError(f"{source} has no feature columns besides the target {targets}")
    x = _numeric(frame[chosen], source)
    return x, y, names


def _read_frame(file: Path):
    import pandas as pd

    if file.suffix in (".csv", ".tsv"):
        return pd.read_csv(file, sep="\t" if file.suffix == ".tsv" else ",")
    try:
        return pd.read_parquet(file)
    except ImportError as error:
        raise ImportError(f"reading {file.name} (Parquet) needs pyarrow: pip install 'xentlab[tables]' "
                          "(or pip install pyarrow)") from error


def _read_npz(file: Path, target, features) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if target is not None or features is not None:
        raise ValueError(f"{file.name} is an .npz file: its arrays X and y are the features and labels, so "
                         "data.target and data.features must stay null")
    with np.load(file, allow_pickle=False) as arrays:
        missing = [name for name in ("X", "y") if name not in arrays.files]
        if missing:
            raise ValueError(f"{file.name} lacks array(s) {', '.join(missing)}; an .npz file for data=table "
                             f"holds X (rows) and y (labels); it has: {', '.join(arrays.files) or 'nothing'}")
        x, y = arrays["X"], arrays["y"]
    if len(x) != len(y):
        raise ValueError(f"{file.name}: X has {len(x)} rows but y has {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{file.name}: X must be numeric, got dtype {x.dtype}")
    if y.ndim == 2:
        names = [str(i) for i in range(y.shape[1])]
        return x, _check_multi_hot(y, file.name), names
    y, names = encode_labels(y, file.name)
    return x, y, names


def _check_column(column: str, columns: list[str], source: str) -> None:
    if column not in columns:
        close = difflib.get_close_matches(column, columns, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{source} has no column {column!r}{hint} (its columns: {', '.join(columns)})")


def _multi_hot_columns(frame, source: str) -> np.ndarray:
    try:
        values = frame.astype("float64").to_numpy()
    except (TypeError, ValueError):
        raise ValueError(f"{source}: the target columns {list(frame.columns)} of a multilabel target must "
                         "hold 0/1 (or true/false) per label") from None
    return _check_multi_hot(values, source)


def _check_multi_hot(y: np.ndarray, source: str) -> np.ndarray:
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{source}: multilabel targets must be 0/1 per label, got values "
                         f"{sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return y.astype(np.int64)


def _is_list(cell) -> bool:
    return isinstance(cell, (list, tuple, np.ndarray))


def _numeric(frame, source: str) -> np.ndarray:
    import pandas as pd

    bad = [c for c in frame.columns if not (pd.api.types.is_numeric_dtype(frame[c])
                                            or pd.api.types.is_bool_dtype(frame[c]))]
    if bad:
        raise ValueError(f"{source}: feature column(s) {', '.join(map(repr, bad))} are not numeric; encode "
                         "them as numbers first, or choose the numeric columns with "
                         f"data.features=[{','.join(c for c in frame.columns if c not in bad)}]")
    x = frame.to_numpy(dtype=np.float64)
    if np.isnan(x).any():
        rows = int(np.isnan(x).any(axis=1).sum())
        raise ValueError(f"{source}: {rows} row(s) have missing feature values; fill or drop them first")
    return x


def existing(path, key: str, suffixes: Sequence[str] | None = None) -> Path:
    if path is None:
        raise ValueError(f"{key} must be set (the file or folder to read)")
    file = Path(str(path)).expanduser()
    if not file.exists():
        raise ValueError(f"{key}={path}: no such file or folder (working directory {Path.cwd()})")
    if suffixes is not None and file.suffix.lower() not in suffixes:
        raise ValueError(f"{key}={path}: a table must be one of {', '.join(suffixes)}, got {file.suffix!r}")
    return file


# --- image folders ------------------------------------------------------------------------------------

def read_image_folder(root: str, image_size: int | Sequence[int] = 32, channels: int = 3) \
        -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images and labels from torchvision's ImageFolder layout: `root/<class>/<image>`, one sub-folder per
    class (classes sorted by name), every image resized to `image_size` (an int for square images, or
    [height, width]) and read as RGB (`channels=3`) or grey (`channels=1`); uint8 (N, C, H, W)."""
    folder = existing(root, "data.root")
    height, width = _image_size(image_size)
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()))
    return _read_images(folder, height, width, channels, stamp)


@functools.lru_cache(maxsize=2)
def _read_images(folder: Path, height: int, width: int, channels: int, stamp) -> tuple:
    # Cached on the folder's listing: the jobs of a joblib sweep share worker processes.
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"data.root={folder} must hold one sub-folder per class (at least 2), "
                         f"found {classes or 'none'}")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {folder / name} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            with Image.open(file) as image:
                image = image.convert("RGB" if channels == 3 else "L").resize((width, height),
                                                                             Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
            images.append(pixels.reshape(height, width, channels).transpose(2, 0, 1))
            labels.append(index)
    log.info("%s: classes mapped to indices: %s", folder.name,
             ", ".join(f"{i}={n!r}" for i, n in enumerate(classes)))
    x, y = np.stack(images), np.array(labels, dtype=np.int64)
    x.setflags(write=False)
    return x, y, classes


def _image_size(image_size) -> tuple[int, int]:
    size = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"data.image_size must be a positive int or [height, width], got {image_size!r}")
    return size[0], size[1]


# --- CIFAR --------------------------------------------------------------------------------------------

# The official python versions (https://www.cs.toronto.edu/~kriz/cifar.html): archive, md5 of the
# archive, the folder it unpacks to, its training and test files, and the key of the labels.
CIFAR = {
    10: ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
         "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
          "cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def read_cifar(root: str, num_classes: int, download: bool = False) -> dict:
    """The official CIFAR-10 or CIFAR-100 python pickles under `root` as {"train": (x, y), "test": (x, y)},
    x uint8 (N, 3, 32, 32); with `download`, the archive is fetched (and its md5 checked) first if the
    folder is missing."""
    url, md5, folder_name, train_files, test_files, key = CIFAR[num_classes]
    if root is None:
        raise ValueError(f"data.root must be the folder that holds {folder_name}/")
    if download and not (Path(str(root)).expanduser() / folder_name).is_dir():
        fetch_archive(url, md5, Path(str(root)).expanduser())
    folder = cifar_folder(root, num_classes)
    return {"train": _read_cifar_files(folder, tuple(train_files), key),
            "test": _read_cifar_files(folder, tuple(test_files), key)}


def cifar_folder(root: str, num_classes: int) -> Path:
    """The folder of the official CIFAR-10 (100) python files under `root`, or a ValueError saying where
    to put them."""
    url, md5, folder_name, train_files, test_files, _ = CIFAR[num_classes]
    if root is None:
        raise ValueError(f"data.root must be the folder that holds {folder_name}/")
    folder = Path(str(root)).expanduser() / folder_name
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"CIFAR-{num_classes} not found: {folder} must hold the official python version's files "
            f"({', '.join(train_files + test_files)}; missing: {', '.join(missing)}). Download {url} "
            f"(md5 {md5}) and unpack it into {folder.parent}, or set data.download=true on a machine with "
            "internet access")
    return folder


@functools.lru_cache(maxsize=4)
def _read_cifar_files(folder: Path, files: tuple[str, ...], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # the files were pickled by Python 2
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[key], dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def fetch_archive(url: str, md5: str, root: Path) -> None:
    """Downloads the .tar.gz at `url` into `root`, checks its md5 and unpacks it there; a failed download
    is a clear error saying where to put the files by hand."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[1]
    if not (archive.is_file() and _md5(archive) == md5):
        partial = archive.with_suffix(archive.suffix + ".part")
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise ValueError(f"data.download=true could not fetch {url} ({error}); download it on a machine "
                             f"with internet access and unpack it into {root}") from error
        partial.replace(archive)
        if _md5(archive) != md5:
            raise ValueError(f"{archive} has md5 {_md5(archive)}, not the official {md5}: a broken download; "
                             "delete it and try again")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")


def _md5(file: Path) -> str:
    digest = hashlib.md5()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- factories (`data._target_`) ------------------------------------------------------------------------

def import_object(target: str, key: str):
    """The object at the dotted path `target` (`pkg.module.name`) for the setting `key` (e.g.
    `data._target_`), or a ValueError saying why not. Modules are found on sys.path and in the working
    directory, as `python -m` finds them (a console script like xentlab-train does not look there)."""
    module_name, _, attribute = str(target).rpartition(".")
    if not module_name:
        raise ValueError(f"{key}={target!r} must be a dotted path pkg.module.name")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{key}={target}: cannot import it ({type(error).__name__}: {error})") from error


def import_factory(target: str) -> Callable:
    """The callable at the dotted path `target` (`pkg.module.factory`), or a ValueError saying why not."""
    factory = import_object(target, "data._target_")
    if not callable(factory):
        raise ValueError(f"data._target_={target} is a {type(factory).__name__}, not a callable")
    return factory


def check_factory_params(target: str, params: dict) -> None:
    """Refuse parameters the factory at `target` does not take (unless it takes **kwargs)."""
    factory = import_factory(target)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # a builtin without a signature: it will say so itself
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"data._target_={target} takes no parameter(s) {', '.join(unknown)}; it takes: "
                        f"{', '.join(accepted) or 'none'}")


def call_factory(target: str, params: dict, seed: int):
    """The factory's data as arrays: (x, y), or {"train": (x, y), "val": ..., "test": ...} when it returns
    its own splits. The factory may return (X, y) arrays (numpy or torch), a map-style dataset whose items
    are (x, y) pairs (a torch Dataset), or three splits of either: a (train, val, test) tuple or a dict
    with those keys. It gets `seed` when it takes one."""
    factory = import_factory(target)
    try:
        takes_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_seed = False
    result = factory(**params, seed=seed) if takes_seed else factory(**params)
    label = f"data._target_={target}"
    if isinstance(result, dict) and set(result) != {"train", "val", "test"}:
        raise ValueError(f"{label} returned a dict with keys {sorted(result)}; splits are a dict with "
                         "exactly the keys train, val, test")
    if isinstance(result, (tuple, list)) and len(result) == 3:
        result = dict(zip(("train", "val", "test"), result, strict=True))
    if not isinstance(result, dict):
        x, y = _pair(result, label)
        return x, _labels(y, label)
    pairs = {name: _pair(part, f"{label} ({name})") for name, part in result.items()}
    # One mapping for all three splits, so a class has the same index in each.
    sizes = np.cumsum([0] + [len(y) for _, y in pairs.values()])
    y_all = _labels(np.concatenate([y for _, y in pairs.values()]), label)
    return {name: (x, y_all[start:stop])
            for (name, (x, _)), start, stop in zip(pairs.items(), sizes[:-1], sizes[1:], strict=True)}


def _pair(data, label: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, tuple)):
        items = [data[i] for i in range(len(data))]
        if not items or not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise ValueError(f"{label}: a dataset's items must be (x, y) pairs, and it must not be empty")
        x = np.stack([np.asarray(item[0]) for item in items])
        y = np.stack([np.asarray(item[1]) for item in items])
    else:
        raise ValueError(f"{label} returned {type(data).__name__}; a data factory returns (X, y) arrays, a "
                         "dataset whose items are (x, y), or train/val/test splits of either")
    if len(x) != len(y):
        raise ValueError(f"{label}: X has {len(x)} rows but y has {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{label}: X must be numeric, got dtype {x.dtype}")
    return x, y


def _labels(y: np.ndarray, label: str) -> np.ndarray:
    return _check_multi_hot(y, label) if y.ndim == 2 else encode_labels(y, label)[0]
