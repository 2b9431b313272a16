"""The training spine: Hydra composition, an in-process run, the console script, a multirun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from xentlab.lab.run import Unprofiled, build_run, train
from xentlab.lab.validation import ConfigError, check_config, sweep_jobs_to_check
from xentlab.train import CONFIG_DIR

TINY = ["data.n_samples=400", "model.hidden_sizes=[16]"]


def run_cli(args: list[str], cwd: Path, timeout: float = 180, full_error: bool = False) \
        -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("xentlab-train")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_compose_and_train_in_process(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, "trainer.max_epochs=2"])
    (record,) = train(cfg, tmp_path)
    assert record["status"] == "completed"
    assert record["epochs"] == 2
    for key in ("train/loss", "val/loss", "val/accuracy", "test/loss", "test/accuracy"):
        assert key in record["metrics"], key
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == record["metrics"]
    assert saved["config"]["loss"]["name"] == "ce"
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_default_config_is_the_documented_default():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config")
    assert (cfg.data.name, cfg.data.n_classes, cfg.data.imbalance_ratio) == ("classification", 5, 10)
    assert (cfg.model.name, cfg.loss.name, cfg.trainer.accelerator) == ("mlp", "ce", "cpu")
    assert "Adam" in cfg.optimizer._target_


def test_console_script_writes_logs_and_metrics(tmp_path):
    result = run_cli([*TINY, "trainer.max_epochs=1"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    # Paths print relative to the working directory, all of them.
    relative = str(run_dir.relative_to(tmp_path))
    assert f"logs: {relative}\n" in result.stdout and f"tensorboard --logdir {relative}\n" in result.stdout
    assert f"({relative}/metrics.json)" in result.stdout and str(tmp_path) not in result.stdout
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed"
    balanced = record["metrics"]["test/balanced_accuracy"]
    assert f"[xentlab] completed: test balanced_accuracy {balanced:.3f}" in result.stdout
    assert "litlogger" not in result.stdout + result.stderr  # Lightning's start-up chatter is off
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_multirun_names_job_folders_after_overrides(tmp_path):
    result = run_cli(["-m", *TINY, "trainer.max_epochs=1", "seed=0,1"], tmp_path)
    assert result.returncode == 0, result.stderr
    records = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/metrics.json"))
    # Hydra's override_dirname of the keys the sweep varies: the constants (data.n_samples, ...) stay out.
    assert [p.parent.name for p in records] == ["seed=0", "seed=1"]
    for record in records:
        assert json.loads(record.read_text())["status"] == "completed"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["seed=abc"], ["seed must be an integer", "'abc'"]),
        (["loss=focal", "loss.gama=1"], ["'gama'", "did you mean 'gamma'"]),
        (["data.n_sampels=400"], ["data.n_sampels", "did you mean data.n_samples"]),
        (["loss=nosuch"], ["loss=nosuch: no such loss config", "ce", "focal"]),
        # refused before the sweep's first job
        (["-m", "loss=ce,nosuch"], ["loss=nosuch: no such loss config", "focal"]),
        (["-m", "loss=focal", "loss.gamma=1,-1"], ["gamma", "got -1", "loss.gamma=-1", "no job was started"]),
        (["data.n_samples=-5"], ["data.n_samples", "-5"]),
        (["data=multilabel"], ["'ce' does not support multilabel", "bce"]),
    ],
)
def test_an_invalid_setting_is_one_message_and_exit_status_2(tmp_path, overrides, expected):
    result = run_cli([*overrides, "trainer.max_epochs=1"], tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "+loss" not in result.stderr and "+data" not in result.stderr
    assert result.stderr.count("xentlab-train: ") == 1 and result.stderr.startswith("xentlab-train: ")
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} missing from:\n{result.stderr}"
    assert not list(tmp_path.glob("outputs/**/events.out.tfevents.*")), "training started despite bad input"


def test_hydra_full_error_shows_the_traceback(tmp_path):
    result = run_cli(["seed=abc"], tmp_path, timeout=60, full_error=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError: seed" in result.stderr


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss=focal", "loss.gamma=-1"], r"loss 'focal': gamma .*\[0.0, inf\], got -1"),
        (["loss=focal", "loss.alpha=foo"], r"alpha must be .* inverse_frequency .* got 'foo'"),
        (["loss.reduction=total"], r"loss 'ce': reduction must be one of none, mean, sum, got 'total'"),
        (["trainer.gradient_clip=1"], r"trainer.gradient_clip is not .* mean trainer.gradient_clip_val"),
        (["trainer.max_epochs=0"], r"trainer.max_epochs must be an integer >= 1, got 0"),
        (["trainer.limit_train_batches=0"], r"trainer.limit_train_batches=0 trains nothing"),
        (["loss=custom"], r"loss=custom needs the class to build: loss._target_="),
    ],
)
def test_config_checks_name_the_key_the_value_and_the_choices(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        check_config(composed(*overrides))


def test_an_accelerator_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="accelerator=gpu, but torch finds no CUDA GPU.*trainer=cpu"):
        check_config(composed("trainer=gpu"))


def test_every_trainer_argument_and_loss_parameter_is_settable_without_plus(tmp_path):
    cfg = composed("loss=focal", "loss.reduction=sum", "loss.backend=reference", "loss.ignore_index=-1",
                   "trainer.gradient_clip_val=0.5", "trainer.accumulate_grad_batches=2")
    check_config(cfg)
    trainer, module, _ = build_run(cfg, tmp_path)
    assert (trainer.gradient_clip_val, trainer.accumulate_grad_batches) == (0.5, 2)
    assert trainer.progress_bar_callback is None  # enable_progress_bar: null, and stdout is no terminal
    assert isinstance(trainer.profiler, Unprofiled)  # no profiler unless asked for, and none of its cost
    (loss,) = module.losses
    assert (loss.reduction, loss.backend, loss.ignore_index) == ("sum", "reference", -1)


def test_a_profiler_the_user_asks_for_is_the_one_the_trainer_runs(tmp_path):
    from pytorch_lightning.profilers import SimpleProfiler

    trainer, _, _ = build_run(composed("+trainer.profiler=simple"), tmp_path)
    assert isinstance(trainer.profiler, SimpleProfiler)


def test_ddp_on_two_cpu_processes_shards_training_and_reports_global_metrics(tmp_path):
    import torch
    from sklearn.metrics import balanced_accuracy_score
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xentlab.lab.board import board_tag
    from xentlab.lab.data import build_datamodule
    from xentlab.lab.models import build_model

    overrides = [*TINY, "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]
    result = run_cli(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist" not in result.stderr  # epoch values are synced, and Lightning knows it
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed"

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    data = build_datamodule(seed=cfg.seed, **cfg.data)
    # Each process ran its half of the training split: half the single-process steps per epoch.
    events = EventAccumulator(str(run_dir))
    events.Reload()
    per_process = -(-len(data.splits["train"][1]) // 2)
    steps_per_epoch = -(-per_process // cfg.data.batch_size)
    assert events.Scalars(board_tag("train/logit_grad_norm"))[-1].step == 2 * steps_per_epoch - 1
    # Test metrics cover the whole test split, not one process's half: recompute from the final weights.
    model = build_model(**cfg.model, in_features=data.num_features, num_outputs=data.num_classes)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    x, y = data.splits["test"]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    expected = balanced_accuracy_score(y.numpy(), predicted.numpy())
    assert record["metrics"]["test/balanced_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_the_pre_sweep_check_composes_one_job_per_joint_combination_not_the_whole_grid():
    grid = [[f"loss={loss}", f"data.imbalance_ratio={ratio}", f"seed={seed}"]
            for loss in ("ce", "focal", "mse") for ratio in (1, 10, 100) for seed in range(10)]
    kept = sweep_jobs_to_check(grid)
    assert len(kept) == 10  # 9 loss x ratio combinations, and the 10 seeds spread over them
    assert {o for job in kept for o in job} == {o for job in grid for o in job}
    assert {tuple(job[:2]) for job in kept} == {tuple(job[:2]) for job in grid}
    assert kept[0] == grid[0] and all(job in grid for job in kept)
    assert sweep_jobs_to_check([[]]) == [[]]
