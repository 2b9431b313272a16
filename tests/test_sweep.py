"""Sweeps: real multiruns via joblib, submitit and Optuna, then the report; failing jobs; resume; folders."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xentlab.lab.board import board_tag
from xentlab.lab.run import train
from xentlab.lab.sweep import available_cpus, sweep_value, threads_per_job
from xentlab.train import CONFIG_DIR

TINY = ["data.n_samples=400", "trainer.max_epochs=1", "model.hidden_sizes=[16]"]
TINY_MODEL = TINY[1:]
DIGITS_10_100 = ["data=digits", "data.imbalance_ratio=10,100"]  # 100: a class the data leaves too small


def sweep(args: list[str], cwd: Path, timeout: float = 240, status: int = 0, tiny: list[str] = TINY) \
        -> tuple[subprocess.CompletedProcess, Path]:
    """Run `xentlab-train -m <tiny> <args>` in `cwd`, expecting exit `status` (1: a job failed); return the
    process and its (single) sweep folder."""
    script = Path(sys.executable).with_name("xentlab-train")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([str(script), "-m", *tiny, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep_dir,) = (cwd / "outputs" / "multirun").glob("*/*")
    return result, sweep_dir


def records(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def assert_reported(result: subprocess.CompletedProcess, sweep_dir: Path, groups: int) -> str:
    """The Hydra callback wrote and printed the report at the end of the multirun."""
    assert "sweep report" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    md = (sweep_dir / "report.md").read_text()
    assert f"in {groups} groups" in md
    assert (sweep_dir / "report.csv").exists()
    return md


def assert_one_failed_one_reported(sweep_dir: Path, result: subprocess.CompletedProcess) -> dict:
    """ratio 100 leaves the digits' rarest class 1 training sample, fewer than data.min_class_samples: only
    the data can tell (a bundled dataset's counts), inside the job, after the pre-sweep check passed it.
    That job is recorded as failed with its error, the other completes, and the report lists both."""
    runs = records(sweep_dir)
    assert sorted((name.split(",")[0], r["status"]) for name, r in runs.items()) == [
        ("data.imbalance_ratio=10", "completed"), ("data.imbalance_ratio=100", "failed")]
    failed = next(r for r in runs.values() if r["status"] == "failed")
    assert "imbalance_ratio=100" in failed["error"] and "1 samples" in failed["error"] and failed["traceback"]
    md = assert_reported(result, sweep_dir, groups=1)
    assert "1 completed runs" in md and "1 failed or incomplete" in md
    assert "| failed | ConfigError: data.imbalance_ratio" in md
    completed = next(r for r in runs.values() if r["status"] == "completed")
    assert "test/balanced_accuracy" in completed["metrics"]
    return completed


def test_joblib_sweep_with_a_failing_job_then_report(tmp_path):
    result, sweep_dir = sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *DIGITS_10_100], tmp_path,
                              status=1, tiny=TINY_MODEL)
    completed = assert_one_failed_one_reported(sweep_dir, result)
    # The console: the sweep announced once, one line per finished job, the class-count table once.
    output = result.stdout + result.stderr
    assert f"[xentlab] 2 jobs -> {sweep_dir.relative_to(tmp_path)}\n" in result.stdout
    assert "[1/2] data.imbalance_ratio=10 val/balanced_accuracy " in result.stdout  # the objective
    assert "[2/2] data.imbalance_ratio=100 FAILED: ConfigError: data.imbalance_ratio" in result.stdout
    assert output.count("class counts per split") == 1 and "#0 :" not in output
    # Two parallel jobs share the cores: cores // 2 intra-op threads each, never more.
    assert completed["torch_threads"] == max(1, available_cpus() // 2)


def test_submitit_local_sweep_with_a_failing_job_then_report(tmp_path):
    result, sweep_dir = sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                               *DIGITS_10_100], tmp_path, status=1, tiny=TINY_MODEL)
    assert (sweep_dir / ".submitit").is_dir()  # the jobs really went through submitit
    completed = assert_one_failed_one_reported(sweep_dir, result)
    assert completed["torch_threads"] == 1  # cpus_per_task unset: every local job starts at once


def test_optuna_sweeper_tunes_a_loss_parameter(tmp_path):
    result, sweep_dir = sweep(["experiment=tune_focal", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1"],
                              tmp_path)
    runs = records(sweep_dir)
    assert len(runs) == 2 and all(r["config"]["loss"]["name"] == "focal" for r in runs.values())
    gammas = {r["config"]["loss"]["gamma"] for r in runs.values()}
    assert len(gammas) == 2 and all(0.0 <= g <= 5.0 for g in gammas)
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_params["loss.gamma"] in gammas
    assert_reported(result, sweep_dir, groups=2)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def train_loss_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(board_tag("train/loss"))]


def test_resume_from_last_checkpoint_continues_the_curves(tmp_path):
    (first,) = train(composed(), tmp_path)
    assert first["epochs"] == 1 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    steps_per_epoch = checkpoint["global_step"]
    assert train_loss_steps(tmp_path) == [steps_per_epoch - 1]
    # A single run's checkpoint keeps the layout single runs always wrote (no seed axis in its names):
    # rewritten here into the oldest form, with the recorder's scalar losses, it still resumes.
    assert not [key for key in checkpoint["state_dict"] if key.startswith(("losses.", "metrics.0."))]
    recorder = checkpoint["callbacks"]["RunRecorder"]
    checkpoint["callbacks"]["RunRecorder"] = {
        "config": recorder["config"], "initial_loss": recorder["initial_losses"][0],
        "epoch_losses": [epoch[0] for epoch in recorder["epoch_losses"]]}
    torch.save(checkpoint, last)

    (resumed,) = train(composed("trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert resumed["status"] == "completed" and resumed["epochs"] == 2
    continued = torch.load(last, weights_only=False)
    assert continued["global_step"] == 2 * steps_per_epoch
    assert len(continued["callbacks"]["RunRecorder"]["epoch_losses"]) == 2  # the old epoch's loss kept
    # One curve across both sessions: the second epoch's point comes after the first, not at step 0 again.
    assert train_loss_steps(tmp_path) == [steps_per_epoch - 1, 2 * steps_per_epoch - 1]

    # A job that already finished is not trained again when a sweep is resumed.
    written = (tmp_path / "metrics.json").stat().st_mtime_ns
    (again,) = train(composed("trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert again["metrics"] == resumed["metrics"]
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == written


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="train/loss is nan"):
        train(composed("optimizer.lr=1e30", "trainer.max_epochs=3"), tmp_path)


class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2024, 5, 1, 12, 0, 0)


def test_two_sweeps_started_in_the_same_second_get_separate_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("hydra.core.utils.datetime", FrozenClock)  # what Hydra's ${now:...} reads
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # Each compose is a new config with its own resolver cache, as each `xentlab-train -m` process is.
        folders = [compose(config_name="config", return_hydra_config=True).hydra.sweep.dir for _ in range(3)]
    base = "outputs/multirun/2024-05-01/12-00-00"
    assert folders == [base, f"{base}_1", f"{base}_2"]
    assert all((tmp_path / f).is_dir() for f in folders)


@pytest.mark.parametrize(("launcher", "cpus", "expected"), [
    ({"n_jobs": -1}, 8, 1),           # joblib default: one job per core
    ({"n_jobs": 2}, 8, 4),
    ({"n_jobs": -2}, 8, 1),           # 7 jobs on 8 cores
    ({"n_jobs": 16}, 8, 1),
    ({"cpus_per_task": 3}, 8, 3),     # submitit
    ({"cpus_per_task": None}, 8, 1),
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 8, 1),  # one job at a time
])
def test_threads_per_job(launcher, cpus, expected):
    assert threads_per_job(OmegaConf.create(launcher), cpus) == expected
    assert threads_per_job(OmegaConf.create(launcher), cpus, requested=3) == 3  # `threads=3` wins


@pytest.mark.parametrize("requested", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(requested):
    with pytest.raises(ValueError, match=f"threads must be a positive integer.*{requested!r}"):
        threads_per_job(OmegaConf.create({"n_jobs": 2}), 8, requested)


def test_sweep_value_is_the_objective_metric_and_optuna_gets_an_error_for_nan():
    record = {"metrics": {"test/ece": 0.05, "val/balanced_accuracy": 0.7}}
    assert sweep_value(record, "val/balanced_accuracy", must_be_finite=True) == 0.7
    assert sweep_value(record, "hp/ece", must_be_finite=True) == 0.05  # hp/<m> is the final test/<m>
    assert math.isnan(sweep_value(record, "test/nll", must_be_finite=False))
    with pytest.raises(ValueError, match="objective 'test/nll' is nan.*test/ece, val/balanced_accuracy"):
        sweep_value(record, "test/nll", must_be_finite=True)
