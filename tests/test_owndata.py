"""The user's own data: tables (CSV, Parquet, npz), image folders, CIFAR-LT from the official pickle layout,
and any importable factory; each through the lab's protocol (profile, splits, scaling), each refusal
naming the setting to change. All data here is tiny and written by the tests: no network."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from _fakedata import PER_CLASS, TEST_PER_CLASS, write_fake_cifar10

from xentlab.lab.data import build_datamodule, crop_flip
from xentlab.lab.datasets import SPLITS, cifar_lt_counts
from xentlab.lab.validation import ConfigError, check_data


def total_counts(datamodule) -> list[int]:
    return sum(datamodule.counts(name) for name in SPLITS).tolist()


@pytest.fixture(scope="module")
def frame():
    """120 rows: two numeric features, a boolean one, a string label with 3 classes (60/40/20)."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    labels = np.array(["cat"] * 60 + ["dog"] * 40 + ["emu"] * 20)
    shift = {"cat": 0.0, "dog": 2.0, "emu": -2.0}
    return pd.DataFrame({"a": rng.normal(size=120) + [shift[v] for v in labels], "b": rng.normal(5, 3, 120),
                         "flag": rng.random(120) > 0.5, "animal": labels})


@pytest.fixture(scope="module")
def tables(frame, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tables")
    frame.to_csv(folder / "animals.csv", index=False)
    frame.to_parquet(folder / "animals.parquet")
    codes = {"cat": 0, "dog": 1, "emu": 2}
    np.savez(folder / "animals.npz", X=frame[["a", "b", "flag"]].to_numpy(float),
             y=frame["animal"].map(codes).to_numpy())
    return folder


@pytest.mark.parametrize("file", ["animals.csv", "animals.parquet", "animals.npz"])
def test_a_table_is_read_mapped_split_and_standardised(tables, file, caplog):
    target = None if file.endswith(".npz") else "animal"
    with caplog.at_level("INFO", logger="xentlab.lab.data"):
        datamodule = build_datamodule("table", path=str(tables / file), target=target, seed=0)
    assert datamodule.task == "multiclass" and datamodule.num_classes == 3 and datamodule.num_features == 3
    assert total_counts(datamodule) == [60, 40, 20]  # every row, classes in sorted label order
    if target:
        assert "0='cat', 1='dog', 2='emu'" in caplog.text  # the mapping is logged
    for name, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):  # stratified
        assert np.all(np.abs(datamodule.counts(name).numpy() - fraction * np.array([60, 40, 20])) <= 1)
    x_train = datamodule.splits["train"][0].double()
    torch.testing.assert_close(x_train.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_a_table_takes_the_long_tail_protocol(tables):
    path = str(tables / "animals.csv")
    datamodule = build_datamodule("table", path=path, target="animal", imbalance_ratio=4, seed=0)
    assert total_counts(datamodule) == [60, 30, 15]  # the largest exact profile with head = 4 x tail
    balanced = build_datamodule("table", path=path, target="animal", eval_split="balanced", seed=0,
                                val_fraction=0.2, test_fraction=0.2)
    assert balanced.counts("val").tolist() == [4, 4, 4] and balanced.counts("test").tolist() == [4, 4, 4]
    assert balanced.counts("train").tolist() == [52, 32, 12]  # the rest, as the file has them
    chosen = build_datamodule("table", path=path, target="animal", features=["b"], seed=0)
    assert chosen.num_features == 1


def test_multilabel_tables_from_columns_or_a_separator(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    tags = rng.random((200, 3)) > 0.5
    frame = pd.DataFrame({"x1": rng.normal(size=200), "x2": rng.normal(size=200),
                          "red": tags[:, 0].astype(int), "big": tags[:, 1].astype(int), "old": tags[:, 2]})
    frame.to_csv(tmp_path / "columns.csv", index=False)
    columns = build_datamodule("table", path=str(tmp_path / "columns.csv"), target=["red", "big", "old"])
    assert columns.task == "multilabel" and columns.num_classes == 3 and columns.num_features == 2
    assert total_counts(columns) == tags.sum(0).tolist()
    joined = ["|".join(t for t, on in zip(("red", "big", "old"), row, strict=True) if on) or "none"
              for row in tags]
    joined_csv = str(tmp_path / "joined.csv")
    pd.DataFrame({"x1": frame.x1, "x2": frame.x2, "tags": joined}).to_csv(joined_csv, index=False)
    separated = build_datamodule("table", path=joined_csv, target="tags", label_separator="|")
    assert separated.task == "multilabel" and separated.num_classes == 4  # big, none, old, red
    assert check_data_task(path=joined_csv, target="tags", label_separator="|") == "multilabel"


def check_data_task(**data) -> str | None:
    from omegaconf import OmegaConf

    return check_data(OmegaConf.create({"name": "table", **data}))


@pytest.mark.parametrize(("params", "fragments"), [
    ({"path": "nowhere.csv", "target": "animal"}, ["data.path=nowhere.csv", "no such file"]),
    ({"target": "animals"}, ["no column 'animals'", "did you mean 'animal'"]),
    ({"target": None}, ["data.target must name the label column", "animal"]),
    ({"target": "a", "features": ["b"]}, ["has 1 rows", "data.min_class_samples"]),  # 120 classes of 1
    ({"target": "animal", "min_class_samples": 30}, ["class 2 has 20 rows", "min_class_samples=30"]),
    ({"target": "animal", "imbalance_ratio": 100}, ["imbalance_ratio=100", "min_class_samples"]),
])
def test_table_refusals_name_the_setting(tables, params, fragments):
    params = {"path": str(tables / "animals.csv")} | params
    with pytest.raises(ValueError) as error:
        build_datamodule("table", seed=0, **params)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_non_numeric_features_are_refused_with_the_numeric_ones_named(tmp_path, frame):
    frame.assign(city=["x"] * 120).to_csv(tmp_path / "city.csv", index=False)
    with pytest.raises(ValueError, match=r"'city' are not numeric.*data.features=\[a,b,flag\]"):
        build_datamodule("table", path=str(tmp_path / "city.csv"), target="animal")


def test_a_missing_table_is_refused_before_anything_is_built():
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="data.path=missing.csv: no such file"):
        check_data(OmegaConf.create({"name": "table", "path": "missing.csv", "target": "y"}))
    with pytest.raises(ConfigError, match=r"data.path must be set \(data=table needs it\)"):
        check_data(OmegaConf.create({"name": "table", "path": "???", "target": "y"}))


# --- image folders ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """ImageFolder layout: 3 classes of 12, 10 and 8 images of different sizes, one class tinted."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate((("ant", 12), ("bee", 10), ("cow", 8))):
        (root / name).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 128, size=(20 + i, 24, 3), dtype=np.uint8)
            pixels[..., c] += 100
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_is_read_resized_and_normalised_per_channel(image_root):
    datamodule = build_datamodule("image_folder", root=str(image_root), image_size=[8, 6], seed=0,
                                  min_class_samples=2)
    assert datamodule.input_shape == (3, 8, 6) and datamodule.num_classes == 3
    assert total_counts(datamodule) == [12, 10, 8]
    x, _ = datamodule.splits["train"]
    assert x.dtype == torch.uint8  # stored as read; scaled per batch
    batch, _ = next(iter(datamodule.train_dataloader()))
    assert batch.dtype == torch.float32 and batch.shape[1:] == (3, 8, 6)
    whole = datamodule.transforms["train"](x, torch.Generator())  # the training split's own statistics
    torch.testing.assert_close(whole.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    grey = build_datamodule("image_folder", root=str(image_root), image_size=4, channels=1, mean=[0.5],
                            std=[0.25], seed=0)
    assert grey.input_shape == (1, 4, 4)
    test_x, _ = grey.splits["test"]
    expected = (test_x.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(next(iter(grey.test_dataloader()))[0], expected[:len(expected)])


def test_crop_flip_pads_crops_and_flips_each_image_on_its_own():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    seen = set()
    for seed in range(40):
        out = crop_flip(x, 1, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape
        for k in range(2):
            padded = torch.nn.functional.pad(x[k, 0], (1, 1, 1, 1))
            windows = [padded[i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
            match = [(i, flip) for i, w in enumerate(windows) for flip in (False, True)
                     if torch.equal(out[k, 0], w.flip(1) if flip else w)]
            assert match, "every output is a padded crop, maybe flipped"
            seen.add(match[0])
    assert len(seen) == 18  # all 9 offsets, flipped and not


def test_image_settings_are_checked():
    with pytest.raises(ValueError, match="data.crop_padding"):
        build_datamodule("digits", crop_padding=-1)
    with pytest.raises(ValueError, match="data.augment crops and flips images"):
        build_datamodule("digits", augment=True)


# --- CIFAR-LT ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"))


def test_cifar_lt_counts_are_the_papers():
    # Cao et al. 2019's CIFAR-10-LT at rho = 100: 12 406 training images; CIFAR-100-LT: 10 847.
    assert cifar_lt_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(cifar_lt_counts(5000, 10, 100)) == 12406 and sum(cifar_lt_counts(500, 100, 100)) == 10847
    assert cifar_lt_counts(5000, 10, 10, "step") == [5000] * 5 + [500] * 5


@pytest.mark.parametrize("rho", [10, 50, 100, 200])
def test_fake_cifar10_follows_the_profile_exactly(cifar_root, rho):
    datamodule = build_datamodule("cifar10_lt", root=str(cifar_root), imbalance_ratio=rho, seed=3,
                                  eval_split="balanced")
    expected = [int(PER_CLASS * (1 / rho) ** (c / 9)) for c in range(10)]
    assert datamodule.counts("train").tolist() == expected
    assert datamodule.counts("test").tolist() == [TEST_PER_CLASS] * 10  # the official test set
    assert datamodule.counts("val").tolist() == [TEST_PER_CLASS] * 10  # validated on it, as the papers do
    x, y = datamodule.splits["train"]
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0, 0, 0].long(), y)  # images kept with their own labels


def test_fake_cifar10_holds_validation_images_out_of_training(cifar_root):
    datamodule = build_datamodule("cifar10_lt", root=str(cifar_root), imbalance_ratio=10, val_per_class=20,
                                  profile="step", eval_split="balanced", seed=0)
    assert datamodule.counts("val").tolist() == [20] * 10
    assert datamodule.counts("train").tolist() == [180] * 5 + [18] * 5
    train, val = (datamodule.splits[s][0].flatten(1) for s in ("train", "val"))
    assert not (train[:, None, :] == val[None, :, :]).all(2).any()  # disjoint


def test_cifar_without_its_files_says_where_to_put_them(tmp_path):
    from omegaconf import OmegaConf

    data = {"name": "cifar10_lt", "root": str(tmp_path), "download": False, "eval_split": "balanced"}
    with pytest.raises(ConfigError) as error:
        check_data(OmegaConf.create(data))
    message = str(error.value)
    for fragment in (str(tmp_path / "cifar-10-batches-py"), "data_batch_1", "cifar-10-python.tar.gz",
                     "c58f30108f718f92721af3b95e74349a", "data.download=true"):
        assert fragment in message, fragment
    with pytest.raises(ConfigError, match="eval_split is balanced"):
        check_data(OmegaConf.create(data | {"eval_split": "natural"}))


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.request

    def offline(url, filename):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(ValueError, match="could not fetch https://www.cs.toronto.edu/~kriz/cifar-10-python"):
        build_datamodule("cifar10_lt", root=str(tmp_path), download=True, eval_split="balanced")


def test_cifar_training_batches_are_augmented_and_normalised(cifar_root):
    datamodule = build_datamodule("cifar10_lt", root=str(cifar_root), imbalance_ratio=10,
                                  eval_split="balanced", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                                  batch_size=64, seed=0, augment=True)
    x, _ = datamodule.splits["train"]
    first = next(iter(datamodule.train_dataloader()))[0]
    plain = (x.float() / 255 - 0.5) / 0.25
    assert first.shape == (64, 3, 32, 32)
    # An image comes through unchanged with probability 1/81 (no shift) x 1/2 (no flip).
    unchanged = sum(any(torch.equal(image, original) for original in plain) for image in first)
    assert unchanged <= 5
    test = next(iter(datamodule.test_dataloader()))[0]  # evaluation batches are not augmented
    torch.testing.assert_close(test, (datamodule.splits["test"][0][:len(test)].float() / 255 - 0.5) / 0.25)


# --- factories (`data._target_`) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def factory_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factory")
    (folder / "my_factories.py").write_text(textwrap.dedent('''
        import numpy as np
        import torch

        def arrays(n_rows=90, seed=0):
            rng = np.random.default_rng(seed)
            y = np.repeat(["low", "mid", "high"], n_rows // 3)
            return rng.normal(size=(n_rows, 4)) + (y == "high")[:, None], y

        class Pairs(torch.utils.data.Dataset):
            def __init__(self, n):
                self.x, self.y = torch.randn(n, 1, 6, 6), torch.arange(n) % 2
            def __len__(self):
                return len(self.y)
            def __getitem__(self, i):
                return self.x[i], self.y[i]

        def dataset(n=40):
            torch.manual_seed(0)
            return Pairs(n)

        def splits():
            torch.manual_seed(0)
            return {"train": Pairs(40), "val": Pairs(10), "test": (np.ones((12, 3)), np.arange(12) % 2)}

        def text():
            return "not data"
        '''))
    sys.path.insert(0, str(folder))
    yield "my_factories"
    sys.path.remove(str(folder))


def test_a_factory_returning_arrays_gets_the_whole_protocol(factory_module):
    datamodule = build_datamodule(_target_=f"{factory_module}.arrays", n_rows=60, seed=1, imbalance_ratio=2)
    assert datamodule.task == "multiclass" and datamodule.num_classes == 3
    assert total_counts(datamodule) == [20, 14, 10]  # high, low, mid in sorted order; head 2 x tail


def test_a_factory_returning_a_dataset_or_splits(factory_module):
    images = build_datamodule(_target_=f"{factory_module}.dataset", n=40, seed=0)
    assert images.task == "binary" and images.input_shape == (1, 6, 6) and total_counts(images) == [20, 20]
    given = build_datamodule(_target_=f"{factory_module}.splits")
    assert [len(given.splits[s][1]) for s in SPLITS] == [40, 10, 12]  # kept as given
    with pytest.raises(ValueError, match="comes with its own train/val/test splits"):
        build_datamodule(_target_=f"{factory_module}.splits", eval_split="balanced")


@pytest.mark.parametrize(("target", "params", "error", "fragment"), [
    ("nowhere_module.load", {}, ConfigError, "cannot import it"),
    ("{m}.arrays", {"rows": 3}, ConfigError, "takes no parameter(s) rows; it takes: n_rows, seed"),
])
def test_factory_refusals_come_before_anything_is_built(factory_module, target, params, error, fragment):
    from omegaconf import OmegaConf

    with pytest.raises(error) as raised:
        check_data(OmegaConf.create({"_target_": target.format(m=factory_module), "name": "x", **params}))
    assert fragment in str(raised.value)


def test_a_factory_returning_something_else_is_refused(factory_module):
    with pytest.raises(ValueError, match=r"returned str; a data factory returns \(X, y\) arrays"):
        build_datamodule(_target_=f"{factory_module}.text")


def test_the_cifar_lt_experiment_is_the_papers_recipe():
    import subprocess

    from hydra import compose, initialize_config_dir

    from xentlab.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=cifar_lt", "+method=ldam_drw"])
    assert (cfg.data.name, cfg.data.imbalance_ratio, cfg.data.batch_size, cfg.model.name) == \
        ("cifar10_lt", 100, 128, "resnet32")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 2e-4)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_epochs, list(cfg.scheduler.milestones),
            cfg.scheduler.gamma, cfg.trainer.max_epochs) == ("step", 5, [160, 180], 0.01, 200)
    assert cfg.loss.name == "ldam" and cfg.loss.drw_epoch == 160 and cfg.model.head == "cosine"
    from omegaconf import OmegaConf

    sweep = OmegaConf.load(f"{CONFIG_DIR}/experiment/cifar_lt.yaml").hydra.sweeper.params
    assert set(sweep["+method"].split(",")) == {"ce", "weighted_ce", "focal", "logit_adjusted",
                                                "balanced_softmax", "ldam_drw"}
    shown = subprocess.run([sys.executable, "-m", "xentlab.train", "experiment=cifar_lt", "--cfg", "job"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "name: cifar10_lt" in shown.stdout and "name: resnet32" in shown.stdout
