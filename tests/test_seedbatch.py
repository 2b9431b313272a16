"""Seed batches (`seeds: K`, xentlab.lab.run + xentlab.lab.stacking): a batch of K seeds is K independent
runs, written as K runs."""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _interrupting import signal_during_training
from hydra import compose, initialize_config_dir
from torch import nn

from xentlab.lab.run import build_parts, build_run, plan_seeds, seed_config, train
from xentlab.lab.stacking import StackedModel
from xentlab.train import CONFIG_DIR

# label_noise flips a different set of training labels per seed, so the seeds' class counts (and with
# them weighted_ce's weights) differ: each seed's loss must be built from its own counts.
TINY = ["data.n_samples=400", "model.hidden_sizes=[16]", "trainer.max_epochs=2", "data.label_noise=0.1"]


def compose_config(base: list[str], *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


def config(*overrides: str):
    return compose_config(TINY, *overrides)


def final_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}


def batch_slice(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {name: value[k] for name, value in state.items()}


def assert_metrics_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("overrides", [
    ["loss=weighted_ce"],
    ["loss=focal", "scheduler=cosine", "data.sampler=class_balanced", "model.head=cosine"],
    ["model=cnn", "data=digits", "data.max_per_class=40", "data.imbalance_ratio=2", "data.label_noise=0.1"],
], ids=["weighted_ce", "focal-cosine-sampler", "cnn"])
def test_a_seed_trained_in_a_batch_is_the_seed_trained_alone(tmp_path, overrides):
    if "model=cnn" in overrides:  # digits has a fixed size (no n_samples); the CNN no hidden_sizes
        cfg = functools.partial(compose_config, ["trainer.max_epochs=1", "model.channels=[4]", *overrides])
    else:
        cfg = functools.partial(config, *overrides)
    (alone,) = train(cfg("seed=4"), tmp_path / "alone")
    records = train(cfg("seed=3", "seeds=3"), tmp_path / "batch")
    assert [r["config"]["seed"] for r in records] == [3, 4, 5]
    single = final_state(tmp_path / "alone", "model.")
    stacked = final_state(tmp_path / "batch", "model.model.")
    assert single.keys() == stacked.keys()  # BatchNorm's running statistics included
    for name, value in single.items():
        torch.testing.assert_close(stacked[name][1], value, rtol=1e-4, atol=1e-5, msg=name)
    # The loss of seed 4 holds seed 4's class weights (label noise made them differ from seed 3's).
    if "loss=weighted_ce" in overrides:
        weights = final_state(tmp_path / "batch", "losses.")
        torch.testing.assert_close(weights["1.weight"], final_state(tmp_path / "alone", "loss.")["weight"])
        assert not torch.equal(weights["0.weight"], weights["1.weight"])
    assert_metrics_close(records[1]["metrics"], alone["metrics"])
    # Seed 4's own checkpoint is the one its single run writes: same names, values and optimizer state.
    ours, theirs = (torch.load(path / "checkpoints" / "last.ckpt", weights_only=False)
                    for path in (tmp_path / "batch" / "seed=4", tmp_path / "alone"))
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    torch.testing.assert_close(ours["state_dict"], theirs["state_dict"], rtol=1e-4, atol=1e-5)
    assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
    # ... and the position of its training batches' stream, so it continues alone as its single run would.
    streams = [checkpoint["TensorDataModule"]["train_generator"] for checkpoint in (ours, theirs)]
    assert torch.equal(*streams)
    (mine,), (single,) = ours["optimizer_states"], theirs["optimizer_states"]
    assert mine["param_groups"] == single["param_groups"]
    torch.testing.assert_close(mine["state"], single["state"], rtol=1e-4, atol=1e-6)


LOSS_CONFIGS = sorted(p.stem for p in Path(CONFIG_DIR, "loss").glob("*.yaml") if p.stem != "custom")


@pytest.mark.parametrize("loss", [*LOSS_CONFIGS, "custom", "bce-multilabel"])
def test_every_loss_gives_each_seed_its_own_gradient_in_a_batched_step(tmp_path, loss):
    # One step of a batch against each seed's own first step: same logits, loss value and gradients.
    import pytorch_lightning as pl

    special = {"custom": [*TINY, "loss=custom", "loss._target_=torch.nn.CrossEntropyLoss"],
               "bce-multilabel": [*TINY[:2], "loss=bce", "data=multilabel"]}
    cfg = compose_config(special.get(loss, [*TINY, f"loss={loss}"]), "seed=2", "seeds=2")
    trainer, module, data = build_run(cfg, tmp_path)
    module.trainer = trainer
    x, y = next(iter(data.train_dataloader()))
    module.training_step((x, y), 0)["loss"].backward()
    for k, seed in enumerate((2, 3)):
        pl.seed_everything(seed)
        datamodule, own_loss, model = build_parts(seed_config(cfg, seed))
        x_own, y_own = next(iter(datamodule.train_dataloader()))
        torch.testing.assert_close(x[k], x_own)
        own_loss(model(x_own), y_own).backward()
        for name, param in model.named_parameters():
            stacked = dict(module.model.model.named_parameters())[name]
            torch.testing.assert_close(stacked.grad[k], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss, shared", [("ce", True), ("focal", True), ("mse", True),
                                          ("weighted_ce", False), ("ldam", False)])
def test_one_loss_call_serves_the_batch_only_where_it_equals_the_seeds_own_calls(tmp_path, loss, shared):
    # Without label noise the seeds' class counts, and so their losses, are equal; weighted_ce's weighted
    # mean is still no mean of rows (the first step's check refuses it), and LDAM's epoch hook may change it.
    from xentlab.lab.stacking import row_means

    cfg = compose_config([*TINY[:3], f"loss={loss}"], "seed=2", "seeds=3")
    trainer, module, data = build_run(cfg, tmp_path)
    module.trainer = trainer
    batches = iter(data.train_dataloader())
    module.training_step(next(batches), 0)
    assert module._shared_loss is shared
    x, y = next(batches)
    logits = module(x).detach().requires_grad_(True)
    values = module._seed_losses(logits, y)
    own = torch.stack([seed_loss(logits[k], y[k]) for k, seed_loss in enumerate(module.losses)])
    torch.testing.assert_close(values, own, rtol=1e-5, atol=1e-7)
    (grad,), (own_grad,) = (torch.autograd.grad(v.sum(), logits) for v in (values, own))
    torch.testing.assert_close(grad, own_grad, rtol=1e-5, atol=1e-8)
    if loss == "ce":  # rows of the ignored class leave each seed's mean as they leave PyTorch's
        module.losses[0].ignore_index = 0
        expected = torch.stack([torch.nn.functional.cross_entropy(logits[k], y[k], ignore_index=0)
                                for k in range(3)])
        torch.testing.assert_close(row_means(module.losses[0], logits, y), expected)


def test_only_losses_that_declare_a_mean_of_rows_share_one_call():
    """A loss whose mean is something else (class weights, or a plugin that does not say) is never batched
    on the strength of the first step's numbers alone."""
    from xentlab.lab.stacking import interchangeable
    from xentlab.losses import build_loss

    class PluginCE(torch.nn.Module):  # a plugin loss: a mean of rows, but it does not declare it
        reduction = "mean"

        def forward(self, x, y):
            return torch.nn.functional.cross_entropy(x, y, reduction=self.reduction)

    assert interchangeable([build_loss("ce") for _ in range(3)])
    assert interchangeable([build_loss("focal", gamma=2.0) for _ in range(3)])
    assert not interchangeable([build_loss("weighted_ce", weights=[1.0, 2.0, 3.0]) for _ in range(3)])
    assert not interchangeable([build_loss("focal", alpha=[1.0, 2.0, 3.0]) for _ in range(3)])
    assert not interchangeable([PluginCE() for _ in range(3)])


def test_adding_a_seed_to_the_batch_changes_no_other_seed(tmp_path):
    two = train(config("seed=0", "seeds=2"), tmp_path / "two")
    three = train(config("seed=0", "seeds=3"), tmp_path / "three")
    small = final_state(tmp_path / "two", "model.model.")
    large = final_state(tmp_path / "three", "model.model.")
    for k in (0, 1):
        assert_metrics_close(two[k]["metrics"], three[k]["metrics"])
        for name in small:
            torch.testing.assert_close(small[name][k], large[name][k], rtol=1e-5, atol=1e-6, msg=name)
    # ... and the seeds differ from each other: they are not one run copied.
    assert not torch.equal(large["0.weight"][0], large["0.weight"][1])


def test_each_seed_writes_a_run_of_its_own(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xentlab.lab.board import HPARAMS_RUN, board_tag
    from xentlab.lab.report import build_report

    cfg = config("seed=7", "seeds=2", "trainer.log_every_n_steps=1")
    train(cfg, tmp_path, overrides=["loss=ce", "seeds=2", "seed=7"])
    for seed in (7, 8):
        record = json.loads((tmp_path / f"seed={seed}" / "metrics.json").read_text())
        assert record["status"] == "completed" and record["epochs"] == 2
        assert record["overrides"] == ["loss=ce", f"seed={seed}"]
        assert (record["config"]["seed"], record["config"]["seeds"]) == (seed, 1)
        assert record["versions"]["torch"] == torch.__version__  # what the report's set-up section shows
        assert "test/balanced_accuracy" in record["metrics"] and "val/minority_recall" in record["metrics"]
        events = EventAccumulator(str(tmp_path / f"seed={seed}"))
        events.Reload()
        tags = events.Tags()
        assert {board_tag(t) for t in ("train/loss", "val/balanced_accuracy", "train/logit_grad_norm")} \
            <= set(tags["scalars"])
        assert {"loss_curves", board_tag("test/confusion_matrix")} <= set(tags["images"])
        session = EventAccumulator(str(tmp_path / f"seed={seed}" / HPARAMS_RUN))
        session.Reload()
        assert "hp/balanced_accuracy" in session.Tags()["scalars"]
    report = build_report(tmp_path)
    assert [len(group.runs) for group in report.trained] == [2]
    assert not report.pending


def test_ckpt_path_last_resumes_the_batch_and_skips_a_finished_one(tmp_path):
    def global_step():
        return torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]

    first = train(config("seeds=2", "trainer.max_epochs=1"), tmp_path)
    one_epoch = global_step()
    resumed = train(config("seeds=2", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert [r["epochs"] for r in first] == [1, 1] and [r["epochs"] for r in resumed] == [2, 2]
    assert one_epoch > 0 and global_step() == 2 * one_epoch
    again = train(config("seeds=2", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert [r["duration_s"] for r in again] == [r["duration_s"] for r in resumed]  # not retrained
    # One seed of the batch continues alone from its own checkpoint.
    cfg = config("seed=1", "trainer.max_epochs=3")
    cfg.ckpt_path = str(tmp_path / "seed=1" / "checkpoints" / "last.ckpt")
    assert train(cfg, tmp_path / "alone")[0]["epochs"] == 3


def test_gradient_norm_clipping_is_per_seed(tmp_path):
    # Seed k's clipped step is what clipping seed k alone gives, whatever the other seeds' gradients.
    (alone,) = train(config("seed=1", "+trainer.gradient_clip_val=0.05"), tmp_path / "alone")
    batch = train(config("seed=0", "seeds=2", "+trainer.gradient_clip_val=0.05"), tmp_path / "batch")
    single = final_state(tmp_path / "alone", "model.")
    stacked = final_state(tmp_path / "batch", "model.model.")
    for name, value in single.items():
        torch.testing.assert_close(stacked[name][1], value, rtol=1e-4, atol=1e-5, msg=name)
    assert_metrics_close(batch[1]["metrics"], alone["metrics"])


@pytest.mark.parametrize("layers", [
    lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),  # batched matmuls
    lambda: nn.Linear(3, 2, bias=False),
    lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)),  # vmap
], ids=["mlp", "linear", "other"])
def test_stacked_model_applies_model_k_to_slice_k(layers):
    torch.manual_seed(0)
    models = [layers() for _ in range(3)]
    stacked = StackedModel(models)
    x = torch.randn(3, 5, 3)
    out = stacked(x)
    out.sum().backward()
    for k, model in enumerate(models):
        torch.testing.assert_close(out[k], model(x[k]))
        model(x[k]).sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(dict(stacked.model.named_parameters())[name].grad[k], param.grad)


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["seeds=0"], "seeds"),
    (["seeds=2", "optimizer._target_=torch.optim.LBFGS"], "LBFGS"),
])
def test_bad_batch_settings_are_refused_before_training(tmp_path, overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        train(config(*overrides), tmp_path)
    assert not list(tmp_path.rglob("metrics.json"))


def test_seed_overrides_replace_the_batch_settings(tmp_path):
    overrides = ["loss=ce", "seeds=10", "seed=3", "data.seed_like=1"]
    seeds = plan_seeds(config("seed=5", "seeds=2"), tmp_path, overrides)
    assert [s.overrides for s in seeds] == [["loss=ce", "data.seed_like=1", f"seed={s}"] for s in (5, 6)]
    assert [s.dir for s in seeds] == [tmp_path / "seed=5", tmp_path / "seed=6"]
    single = plan_seeds(config("seed=5"), tmp_path, ["seed=5", "loss=ce"])
    assert [(s.dir, s.overrides) for s in single] == [(tmp_path, ["seed=5", "loss=ce"])]


def test_every_seed_of_a_batched_multirun_carries_the_swept_keys_in_its_hparams(tmp_path):
    """A seed of a batch logs what its single run would: its HParams session holds the keys the sweep
    varies, and the loss-vs-probability figure is drawn once per setting, not once per seed. The report
    finds every seed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from xentlab.lab.board import HPARAMS_RUN

    script = Path(sys.executable).with_name("xentlab-train")
    # 1500 samples leave the rarest class at ratio 100 the 10 samples data.min_class_samples asks for.
    sweep = ["data.imbalance_ratio=10,100", "seeds=3", "data.n_samples=1500", "model.hidden_sizes=[16]",
             "trainer.max_epochs=1"]
    result = subprocess.run([str(script), "-m", *sweep], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = (tmp_path / "outputs" / "multirun").glob("*/*/*/seed=*/metrics.json")
    seed_dirs = sorted(p.parent for p in records)
    assert len(seed_dirs) == 6
    ratios, drawn = [], 0
    for seed_dir in seed_dirs:
        session = EventAccumulator(str(seed_dir / HPARAMS_RUN))
        session.Reload()
        data = [plugin_data_pb2.HParamsPluginData.FromString(raw)
                for raw in session.PluginTagToContent("hparams").values()]
        (hparams,) = [d.session_start_info.hparams for d in data if d.HasField("session_start_info")]
        ratios.append(hparams["data.imbalance_ratio"].number_value)
        assert hparams["seed"].string_value == seed_dir.name.removeprefix("seed=")
        events = EventAccumulator(str(seed_dir), size_guidance={"images": 0})
        events.Reload()
        drawn += "loss_curves" in events.Tags()["images"]
    assert sorted(ratios) == [10] * 3 + [100] * 3
    assert drawn == 2  # one per imbalance ratio
    assert "started but have no metrics.json" not in result.stdout
    with open(seed_dirs[0].parents[1] / "report.csv", newline="") as report:
        rows = list(csv.DictReader(report))
    assert sorted((row["data.imbalance_ratio"], row["n"]) for row in rows) == [("10", "3"), ("100", "3")]


# --- records, resume and failures of a batch: what a single run guarantees (docs/trust.md) ---------------


class NaNLoss(nn.Module):
    """A loss that is NaN from the first step, as too high a learning rate makes one seed's."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.inner = loss

    def forward(self, logits, target):
        return self.inner(logits, target) * torch.nan


def poison_seed(monkeypatch, seed: int) -> None:
    """Seed `seed` of any batch built from here on trains on a NaN loss."""
    import xentlab.lab.run as run

    original = run.build_parts

    def build_parts(cfg, show_counts=True):
        datamodule, loss, model = original(cfg, show_counts)
        return datamodule, NaNLoss(loss) if cfg.seed == seed else loss, model

    monkeypatch.setattr(run, "build_parts", build_parts)


def seed_records(folder: Path) -> dict[int, dict]:
    return {json.loads(p.read_text())["config"]["seed"]: json.loads(p.read_text())
            for p in folder.glob("seed=*/metrics.json")}


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_resuming_a_batch_into_a_folder_of_another_configuration_is_an_error(tmp_path, finished):
    from xentlab.lab.runs import FolderHoldsAnotherRun

    train(config("seeds=2", "loss=focal", "trainer.max_epochs=1"), tmp_path)
    written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "events" not in p.name}
    epochs = 1 if finished else 2
    with pytest.raises(FolderHoldsAnotherRun, match=r"loss.name: 'focal' -> 'ce'") as raised:
        train(config("seeds=2", f"trainer.max_epochs={epochs}", "ckpt_path=last"), tmp_path)
    assert "seed=0" in str(raised.value)  # names the folder whose record differs
    assert {p: p.read_bytes() for p in written} == written  # not retrained, nothing overwritten
    # A batch whose records are gone is matched by the config stamped in the batch checkpoint.
    for record in tmp_path.glob("seed=*/metrics.json"):
        record.unlink()
    for folder in tmp_path.glob("seed=*/checkpoints"):
        for checkpoint in folder.iterdir():
            checkpoint.unlink()
    with pytest.raises(FolderHoldsAnotherRun, match=r"checkpoints/last\.ckpt was written for it.*"
                                                    r"loss.name: 'focal' -> 'ce'"):
        train(config("seeds=2", f"trainer.max_epochs={epochs}", "ckpt_path=last"), tmp_path)
    # ... and its own configuration resumes from it.
    resumed = train(config("seeds=2", "loss=focal", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert [r["status"] for r in resumed] == ["completed"] * 2 and [r["epochs"] for r in resumed] == [2, 2]


def test_a_single_run_record_in_the_folder_is_another_configuration_for_a_batch(tmp_path):
    from xentlab.lab.runs import FolderHoldsAnotherRun

    train(config("trainer.max_epochs=1"), tmp_path)
    with pytest.raises(FolderHoldsAnotherRun, match=r"seeds: 1 -> 2"):
        train(config("seeds=2", "trainer.max_epochs=1", "ckpt_path=last"), tmp_path / ".")
    # The other way round: a single run resuming a batch's folder finds the batch's checkpoint.
    batch = tmp_path / "batch"
    train(config("seeds=2", "trainer.max_epochs=1"), batch)
    with pytest.raises(FolderHoldsAnotherRun, match=r"seeds: 2 -> 1"):
        train(config("trainer.max_epochs=2", "ckpt_path=last"), batch)


def test_resuming_a_batch_with_nothing_to_resume_is_an_error_unless_a_sweep_asks_for_a_fresh_start(tmp_path):
    with pytest.raises(ValueError, match=r"nothing to resume in .*hydra\.run\.dir=<its folder>"):
        train(config("seeds=2", "trainer.max_epochs=1", "ckpt_path=last"), tmp_path)
    assert {s: r["status"] for s, r in seed_records(tmp_path).items()} == {0: "failed", 1: "failed"}
    fresh = train(config("seeds=2", "trainer.max_epochs=1", "ckpt_path=last"), tmp_path / "sweep_job",
                        fresh_if_nothing_to_resume=True)
    assert [r["status"] for r in fresh] == ["completed"] * 2


def test_a_seed_whose_loss_goes_nan_fails_alone_and_the_others_complete(tmp_path, monkeypatch):
    (alone,) = train(config("seed=0"), tmp_path / "alone")
    failed_alone = tmp_path / "failed_alone"
    with pytest.raises(FloatingPointError):
        train(config("seed=0", "optimizer.lr=1e30"), failed_alone)
    poison_seed(monkeypatch, 1)
    records = train(config("seed=0", "seeds=3"), tmp_path / "batch")
    assert [r["status"] for r in records] == ["completed", "failed", "completed"]
    assert records[1]["error"].startswith("FloatingPointError: train/loss is nan at epoch 0")
    assert records[1]["epochs"] == 0 and "FloatingPointError" in records[1]["traceback"]
    # Seed 0 trained beside a NaN seed is seed 0 trained alone.
    assert_metrics_close(records[0]["metrics"], alone["metrics"])
    assert records[0]["warnings"] == alone["warnings"] == []
    # One writer for both: each status has the single run's fields (plus the batch it was trained in).
    on_disk = seed_records(tmp_path / "batch")
    single_failed = json.loads((failed_alone / "metrics.json").read_text())
    assert set(on_disk[0]) == set(alone) | {"seed_batch"}
    assert set(on_disk[1]) == set(single_failed) | {"seed_batch"}
    assert on_disk[1]["overrides"] == ["seed=1"] and on_disk[1]["config"]["seed"] == 1


def test_a_seed_that_diverges_with_a_finite_loss_is_flagged_as_a_single_run_is(tmp_path):
    # Adam at lr=1e6: finite losses ~1e5 times the initial one (tests/test_faults.py, single runs).
    records = train(config("seeds=2", "optimizer.lr=1e6"), tmp_path)
    assert [r["status"] for r in records] == ["completed"] * 2
    for record in records:
        assert any(w.startswith("diverged: the last epoch's training loss") for w in record["warnings"])
    assert all(r["warnings"] for r in seed_records(tmp_path).values())


@pytest.mark.parametrize(("sig", "cause"), [(signal.SIGINT, r"SIGINT \(Ctrl-C\)"),
                                           (signal.SIGTERM, "SIGTERM")])
def test_an_interrupted_batch_records_every_unfinished_seed(tmp_path, monkeypatch, sig, cause):
    from xentlab.lab.runs import RunInterrupted

    signal_during_training(monkeypatch, sig, epoch=1)
    poison_seed(monkeypatch, 1)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match=f"interrupted by {cause} in epoch 2; recorded in") as raised:
        train(config("seed=0", "seeds=3", "trainer.max_epochs=5"), tmp_path)
    assert raised.value.exit_code == 128 + sig
    assert signal.getsignal(signal.SIGINT) == handler
    records = seed_records(tmp_path)
    assert {s: r["status"] for s, r in records.items()} == {0: "interrupted", 1: "failed", 2: "interrupted"}
    for seed in (0, 2):
        assert re.search(cause, records[seed]["error"]) and records[seed]["epochs"] == 1
        assert records[seed]["metrics"]["train/loss"] > 0  # what the seed had measured when it stopped
    assert records[1]["error"].startswith("FloatingPointError: train/loss is nan")
