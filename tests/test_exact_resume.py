"""A run interrupted (SIGKILL, SIGTERM) and resumed with `ckpt_path=last` is the run that was not interrupted:
the same final parameters and metrics.json values, exactly, and TensorBoard curves that hold each step once,
with the uninterrupted run's values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _interrupting import signal_during_training
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xentlab.lab.checkpoint import load_checkpoint
from xentlab.lab.run import train
from xentlab.lab.runs import RunInterrupted
from xentlab.train import CONFIG_DIR

# Two training batches an epoch, a point every step (so the interrupted epoch has logged points), one
# torch thread (the same arithmetic in every process).
SETTINGS = ["data.n_samples=400", "model.hidden_sizes=[16]", "trainer.max_epochs=4",
            "trainer.log_every_n_steps=1", "threads=1", "seed=0"]
STOPPED_EPOCH = 2  # interrupted after the first batch of the third epoch; last.ckpt holds two epochs
SCRIPT = Path(sys.executable).with_name("xentlab-train")
# `xentlab-train` whose third epoch stops after its first batch, with that batch's points flushed to the
# event files (as a long epoch's are), touches the file named by argv[1] and waits to be killed there.
STOPPING = textwrap.dedent(f"""
    import pathlib, sys, time
    from xentlab.lab.module import ClassifierModule
    step, stalled = ClassifierModule.training_step, pathlib.Path(sys.argv[1])
    def stalling(self, batch, batch_idx):
        if self.current_epoch == {STOPPED_EPOCH} and batch_idx == 1:
            for logger in self.loggers:
                logger.experiment.flush()
            stalled.touch()
            time.sleep(600)
        return step(self, batch, batch_idx)
    ClassifierModule.training_step = stalling
    from xentlab.train import main
    sys.argv = ["xentlab-train", *sys.argv[2:]]
    main()
""")


def cli(*args: str, script: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([*(script or [str(SCRIPT)]), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> None:
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*SETTINGS, *overrides])


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """The run folder `resumed` holds what `uninterrupted` holds: record, final parameters and curves."""
    ours, theirs = (json.loads((folder / "metrics.json").read_text()) for folder in (resumed, uninterrupted))
    assert ours["status"] == theirs["status"] == "completed"
    assert (ours["epochs"], ours["warnings"]) == (theirs["epochs"], theirs["warnings"])
    assert ours["metrics"].keys() == theirs["metrics"].keys()
    differ = [name for name, value in theirs["metrics"].items() if ours["metrics"][name] != value]
    assert differ == [], f"{resumed}: {len(differ)} of {len(theirs['metrics'])} metrics differ, {differ}"
    ours, theirs = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (resumed, uninterrupted))
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), f"{resumed}: parameter {name} differs"
    ours, theirs = (curves(folder) for folder in (resumed, uninterrupted))
    assert ours == theirs


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run's event files, as TensorBoard's reader shows it (a purge applied);
    asserts each holds a step once."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    found = {tag: [(event.step, event.value) for event in events.Scalars(tag)]
             for tag in events.Tags()["scalars"]}
    for tag, points in found.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{run_dir}: {tag} holds steps twice: {steps}"
    return found


@pytest.fixture(scope="module")
def uninterrupted_batch(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "batch"
    finished(cli(*SETTINGS, "seeds=3", f"hydra.run.dir={run_dir}"))
    return run_dir


def test_a_seed_batch_killed_mid_epoch_resumes_to_the_uninterrupted_batch(tmp_path, uninterrupted_batch):
    run_dir, stalled = tmp_path / "batch", tmp_path / "stalled"
    args = [*SETTINGS, "seeds=3", f"hydra.run.dir={run_dir}"]
    process = cli(str(stalled), *args, script=[sys.executable, "-c", STOPPING])
    try:
        deadline = time.monotonic() + 180
        while not stalled.exists():
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the third epoch did not start within 180 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == STOPPED_EPOCH - 1
    assert not list(run_dir.glob("seed=*/metrics.json"))  # killed: no record was written

    finished(cli(*args, "ckpt_path=last"))
    for seed in range(3):
        assert_same_run(run_dir / f"seed={seed}", uninterrupted_batch / f"seed={seed}")
    batch, reference = (load_checkpoint(folder / "checkpoints" / "last.ckpt")
                        for folder in (run_dir, uninterrupted_batch))
    for name, value in reference["state_dict"].items():
        assert torch.equal(batch["state_dict"][name], value), name


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(composed(), run_dir)
    return run_dir


@pytest.mark.parametrize("stopped_epoch", [1, STOPPED_EPOCH, 3])  # after one, two or three saved epochs
def test_a_run_stopped_by_sigterm_mid_epoch_resumes_to_the_uninterrupted_run(
        tmp_path, monkeypatch, uninterrupted_run, stopped_epoch):
    signal_during_training(monkeypatch, signal.SIGTERM, epoch=stopped_epoch, batch_idx=1, flush=True)
    with pytest.raises(RunInterrupted, match="interrupted by SIGTERM"):
        train(composed(), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["epochs"] == stopped_epoch
    monkeypatch.undo()

    (resumed,) = train(composed("ckpt_path=last"), tmp_path / "run")
    assert resumed["status"] == "completed"
    assert_same_run(tmp_path / "run", uninterrupted_run)
