"""The training spine: Hydra composition, an in-process run, the console script, a multirun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from xentlab.train import CONFIG_DIR, train

TINY = ["data.n_samples=400", "model.hidden_sizes=[16]"]


def run_cli(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("xentlab-train")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_compose_and_train_in_process(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, "trainer.max_epochs=2"])
    record = train(cfg, tmp_path)
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
    assert "tensorboard --logdir" in result.stdout and str(run_dir) in result.stdout
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
    # Hydra's override_dirname: the job's overrides sorted by key, so TensorBoard shows "...,seed=1".
    assert [p.parent.name for p in records] == [
        f"data.n_samples=400,model.hidden_sizes=[16],seed={seed},trainer.max_epochs=1" for seed in (0, 1)
    ]
    for record in records:
        assert json.loads(record.read_text())["status"] == "completed"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss=nosuch", ["loss/nosuch", "ce"]),
        ("data.n_samples=-5", ["n_samples", "-5"]),
        ("data.imbalance_ratio=0.5", ["imbalance_ratio", "0.5"]),
        ("model=nosuch", ["model/nosuch", "mlp", "linear"]),
    ],
)
def test_bad_override_fails_fast_naming_the_problem(tmp_path, override, expected):
    result = run_cli([override, "trainer.max_epochs=1"], tmp_path, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for fragment in expected:
        assert fragment in output, f"{fragment!r} missing from:\n{output}"
    assert not list(tmp_path.glob("outputs/*/*/events.out.tfevents.*")), "training started despite bad input"


def test_ddp_on_two_cpu_processes_shards_training_and_reports_global_metrics(tmp_path):
    import torch
    from sklearn.metrics import balanced_accuracy_score
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xentlab.board import board_tag
    from xentlab.data import build_datamodule
    from xentlab.models import build_model

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
