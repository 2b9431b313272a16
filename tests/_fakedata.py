"""Tiny stand-ins for the user's data that tests write: a fake CIFAR-10 in the official pickle layout."""

from __future__ import annotations

import pickle

import numpy as np

PER_CLASS, TEST_PER_CLASS = 200, 10


def write_fake_cifar10(root, seed: int = 0):
    """The official python layout of CIFAR-10 (cifar-10-batches-py/data_batch_1..5, test_batch: pickled
    dicts of uint8 rows of 3072 pixels and a list of labels), with 200 training and 10 test images per
    class; each image's red value in its first pixel is its class, so labels can be checked."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def images(labels):
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        data[:, 0] = labels
        return data

    train = rng.permutation(np.repeat(np.arange(10), PER_CLASS))
    for i, part in enumerate(np.array_split(train, 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": images(part), "labels": part.tolist(), "batch_label": f"batch {i}"}, f)
    test = np.repeat(np.arange(10), TEST_PER_CLASS)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images(test), "labels": test.tolist()}, f)
    return root
