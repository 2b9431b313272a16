"""Faults a run or a sweep must survive: a full disk, a corrupt checkpoint, SIGKILL, SIGTERM and Ctrl-C, a
resume into the wrong folder, a diverged run. Each one ends in a clear error or an honest record, never a
truncated file under a final name or two jobs in one folder."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _interrupting import signal_during_training
from hydra import compose, initialize_config_dir

from xentlab.lab.atomic import atomic_open, atomic_write, remove_staging_files
from xentlab.lab.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
from xentlab.lab.run import RunRecorder, train
from xentlab.lab.runs import FolderHoldsAnotherRun, RunInterrupted, config_differences, divergence_warnings
from xentlab.train import CONFIG_DIR

TINY = ["data.n_samples=400", "model.hidden_sizes=[16]"]
SCRIPT = Path(sys.executable).with_name("xentlab-train")


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides], return_hydra_config=hydra)


def cli(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


class Custom:
    pass


def staging_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


# --- job folders ---------------------------------------------------------------------------------------


def job_folder(*overrides: str) -> str:
    return composed(*overrides, hydra=True).hydra.job.override_dirname


@pytest.mark.parametrize(("one", "other"), [
    (["experiment=ce_vs_mse", "loss=ce"], ["experiment=calibration", "loss=ce"]),
    (["loss=ce", "threads=1"], ["loss=ce", "threads=2"]),
])
def test_jobs_that_differ_in_any_setting_get_their_own_folders(one, other):
    assert job_folder(*one) != job_folder(*other)


def test_a_resumed_job_is_named_like_the_job_it_resumes():
    assert job_folder("seed=1", "threads=2") == job_folder("seed=1", "threads=2", "ckpt_path=last")


def test_resume_into_a_folder_holding_another_configuration_is_an_error(tmp_path):
    (first,) = train(composed("trainer.max_epochs=1", "loss=focal"), tmp_path)
    written = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(FolderHoldsAnotherRun, match=r"loss.name: 'focal' -> 'ce'") as raised:
        train(composed("trainer.max_epochs=1", "ckpt_path=last"), tmp_path)
    assert str(tmp_path / "metrics.json") in str(raised.value)
    assert (tmp_path / "metrics.json").read_bytes() == written  # the other run's record is left alone
    # The same configuration is matched: its completed record comes back untrained, threads aside.
    (again,) = train(composed("trainer.max_epochs=1", "loss=focal", "ckpt_path=last", "threads=1"), tmp_path)
    assert again["metrics"] == first["metrics"]


def test_a_checkpoint_without_a_record_is_matched_by_the_config_it_carries(tmp_path):
    train(composed("trainer.max_epochs=1", "seed=3"), tmp_path)
    (tmp_path / "metrics.json").unlink()  # as after a SIGKILL: a checkpoint, no record
    stamped = RunRecorder.config_in(load_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))
    assert stamped["seed"] == 3
    with pytest.raises(FolderHoldsAnotherRun, match=r"last\.ckpt was written for it.*seed: 3 -> 4\."):
        train(composed("trainer.max_epochs=2", "seed=4", "ckpt_path=last"), tmp_path)


def test_config_differences_ignore_what_a_resume_may_change():
    recorded = {"seed": 0, "threads": 1, "ckpt_path": None, "trainer": {"max_epochs": 1, "devices": 1}}
    assert config_differences(recorded, {**recorded, "threads": 4, "ckpt_path": "last",
                                         "trainer": {"max_epochs": 9, "devices": 1}}) == []
    assert config_differences(recorded, {**recorded, "loss": {"gamma": 2.0}, "trainer": {"max_epochs": 1}}) \
        == ["loss.gamma: (unset) -> 2.0", "trainer.devices: 1 -> (unset)"]


def test_resume_with_nothing_to_resume_says_how_to_point_at_a_run(tmp_path):
    with pytest.raises(ValueError, match=r"nothing to resume in .*hydra\.run\.dir=<its folder> ckpt_path="):
        train(composed("ckpt_path=last"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_resuming_a_sweep_without_its_folder_is_refused_before_any_job(tmp_path):
    process = cli(["-m", *TINY, "seed=0,1", "ckpt_path=last"], tmp_path)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 2, output[-3000:]
    assert "hydra.sweep.dir=<its folder> ckpt_path=last" in output
    assert not list(tmp_path.rglob("metrics.json")) and "Traceback" not in output


# --- atomic files and corrupt checkpoints ---------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """`folder` as a tmpfs mounted with `options` (root only: CI runs as root); the test is skipped with
    the reason where mounting is refused."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip() or 'refused'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB disk to fill."""
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        yield disk


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` up to `leave` bytes of free space."""
    with open(disk / "filler", "wb") as filler, contextlib.suppress(OSError):
        while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave:
            filler.write(b"\0" * 4096)
            filler.flush()


def test_a_full_disk_leaves_the_previous_file_whole_and_no_temporary_file(small_disk):
    target = small_disk / "metrics.json"
    atomic_write(target, "old\n")
    fill(small_disk, leave=16 * 1024)
    with pytest.raises(OSError) as raised:
        atomic_write(target, "x" * 200_000)
    assert raised.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert staging_files(small_disk) == []

    last = small_disk / "last.ckpt"
    (small_disk / "filler").unlink()
    SafeCheckpointIO().save_checkpoint({"step": 1}, last)
    fill(small_disk, leave=16 * 1024)
    with pytest.raises(OSError, match="No space left"):
        SafeCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(100_000)}, last)
    assert load_checkpoint(last) == {"step": 1}
    assert staging_files(small_disk) == []


def test_atomic_open_removes_its_temporary_file_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError, match="half way"), atomic_open(tmp_path / "report.md") as file:
        file.write("partial")
        raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []
    killed = tmp_path / f".last.ckpt.{os.getpid()}.0123abcd.tmp"  # what a SIGKILL mid-write leaves
    killed.write_bytes(b"x")
    (tmp_path / ".keep.tmp").write_bytes(b"x")  # not ours: kept
    assert remove_staging_files(tmp_path) == [killed] and not killed.exists()


@pytest.mark.parametrize(("content", "reason"), [
    (lambda good: good[: len(good) // 3], "truncated or damaged"),
    (lambda good: b"not a checkpoint\n", "not a PyTorch checkpoint"),
    (lambda good: b"", "truncated or damaged"),
    (lambda good: None, r"Python object \([\w.]*Custom\) beyond tensors"),
])
def test_a_corrupt_checkpoint_names_the_file_and_never_suggests_unsafe_loading(tmp_path, content, reason):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}, "epoch": 1}, path)
    data = content(path.read_bytes())
    if data is None:
        torch.save({"object": Custom()}, path)  # unpickling it would import and build a class
    else:
        path.write_bytes(data)
    with pytest.raises(CheckpointError, match=reason) as raised:
        SafeCheckpointIO().load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert "weights_only" not in str(raised.value) and raised.value.__cause__ is None


def test_a_malicious_checkpoint_is_named_as_code_and_never_run(tmp_path):
    # A pickle that calls os.system when unpickled: torch blocks the module, and the error says so.
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"holds a Python object \(posix\.system\) beyond tensors"):
        load_checkpoint(path)
    assert not (tmp_path / "ran").exists()


class Payload:
    def __reduce__(self):
        return os.system, ("touch ran",)


def test_random_files_are_checkpoint_errors(tmp_path):
    # Random bytes, truncations and corruptions of a real checkpoint: the unpickler fails in many ways
    # (IndexError, KeyError, ...); every one is a CheckpointError naming the file, or a dict.
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(64)}, "epoch": 1, "loops": {"fit": [1, 2]}}, buffer)
    good, rng, path = buffer.getvalue(), random.Random(0), tmp_path / "last.ckpt"
    for number in range(100):
        if number % 3 == 0:
            data = rng.randbytes(rng.randrange(1, 2000))
        elif number % 3 == 1:
            data = good[: rng.randrange(len(good))]
        else:
            data = bytearray(good)
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as error:
            assert str(path) in str(error) and "weights_only" not in str(error)
        else:
            assert isinstance(loaded, dict)


def test_a_file_that_is_not_a_training_checkpoint_is_refused_before_lightning_reads_it(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint .*lacks state_dict, epoch, "):
        SafeCheckpointIO().load_checkpoint(path)


def test_resume_from_a_truncated_last_checkpoint_names_it(tmp_path):
    train(composed("trainer.max_epochs=1"), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {last}: it is truncated"):
        train(composed("trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and str(last) in record["error"]


def refusal(args: list[str], cwd: Path) -> str:
    """xentlab-train's one stderr line for a refused command (exit status 2, nothing on stdout)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stderr.startswith("xentlab-train: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("seeds", [1, 2])
def test_resuming_from_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, seeds):
    run_dir = tmp_path / "run"
    started = cli([*TINY, "trainer.max_epochs=1", f"seeds={seeds}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert started.wait(timeout=180) == 0, started.communicate()[0][-3000:]
    for record in run_dir.rglob("metrics.json"):
        record.unlink()  # as after a SIGKILL: the checkpoint alone
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(random.Random(3).randbytes(3000))
    line = refusal([*TINY, "trainer.max_epochs=2", f"seeds={seeds}", f"hydra.run.dir={run_dir}",
                    "ckpt_path=last"], tmp_path)
    assert f"cannot read checkpoint {last}: it is " in line
    for record in run_dir.rglob("metrics.json"):
        assert "IndexError" not in json.loads(record.read_text()).get("error", "")


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only disk (as root, which CI runs as, a chmod would not stop writes)."""
    with tmpfs(tmp_path / "read-only", "ro,size=64k") as folder:
        yield folder


def test_a_read_only_run_folder_is_one_line(read_only_folder, tmp_path):
    line = refusal([*TINY, f"hydra.run.dir={read_only_folder}"], tmp_path)
    assert f"cannot write {read_only_folder}/train.log: Read-only file system" in line
    line = refusal(["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={read_only_folder}"], tmp_path)
    assert f"cannot write {read_only_folder}/multirun.yaml: Read-only file system" in line


def test_a_sweep_on_a_full_disk_says_the_record_was_lost_and_still_reports(small_disk):
    sweep_dir = small_disk / "sweep"
    sweep_dir.mkdir()
    # Room for Hydra's multirun.yaml only; .hydra/ is switched off, as Hydra writes it unguarded and a
    # failure there ends the sweep inside Hydra (the report is then still written at exit, see below).
    fill(small_disk, leave=8 * 1024)
    process = cli(["-m", *TINY, "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
                   "hydra.output_subdir=null"], small_disk.parent)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]
    assert output.count("its 'failed' record could not be written either") == 2, output[-3000:]
    assert "No space left on device" in output
    assert "sweep report" in output  # the report callback ran (and said why it could not write files)
    assert not list(sweep_dir.rglob("metrics.json")) and not list(sweep_dir.rglob("*.ckpt"))
    assert staging_files(small_disk) == [] and list(small_disk.rglob(".metrics.json*")) == []


def test_a_seed_batch_on_a_full_disk_says_its_records_were_lost(small_disk):
    from xentlab.lab.runs import RunNotRecorded

    fill(small_disk, leave=8 * 1024)
    with pytest.raises(RunNotRecorded, match=r"No space left.*its 'failed' record could not be written "
                                             r"either: .*seed=0/metrics\.json"):
        train(composed("seeds=2", "trainer.max_epochs=1"), small_disk / "batch")
    assert not list(small_disk.rglob("metrics.json")) and not list(small_disk.rglob("*.ckpt"))
    assert staging_files(small_disk) == []


def test_a_sweep_that_dies_inside_hydra_still_reports_what_exists(tmp_path):
    # Hydra writes a job's .hydra/ itself, unguarded (a full disk there ends the sweep inside Hydra, before
    # on_multirun_end); a file where the second job's .hydra/ folder goes fails the same way, every time.
    sweep_dir = tmp_path / "sweep"
    blocked = sweep_dir / "seed=1"  # a job's folder is named by the keys its sweep varies
    blocked.mkdir(parents=True)
    (blocked / ".hydra").write_text("in the way\n")
    process = cli(["-m", *TINY, "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    output = process.communicate(timeout=240)[0]
    assert process.returncode != 0  # Hydra's own error
    assert "sweep report" in output and (sweep_dir / "report.md").exists(), output[-3000:]
    assert "1 completed runs" in (sweep_dir / "report.md").read_text()


# --- how a single run ends -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "cause"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_a_signal_during_training_is_recorded_as_interrupted(tmp_path, monkeypatch, sig, cause):
    signal_during_training(monkeypatch, sig, epoch=1)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match=f"interrupted by {cause}.*in epoch 2; recorded in") as raised:
        train(composed("trainer.max_epochs=5"), tmp_path)
    assert raised.value.exit_code == 128 + sig
    assert signal.getsignal(signal.SIGINT) == handler  # Lightning leaves Ctrl-C ignored; train restores it
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "interrupted" and cause in record["error"] and record["epochs"] == 1
    assert record["metrics"]["train/loss"] > 0  # what the run had measured when it stopped


def test_sigterm_to_the_console_script_records_the_run_and_exits_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    process = cli([*TINY, "trainer.max_epochs=500", f"hydra.run.dir={run_dir}"], tmp_path)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "interrupted" in line]
    assert line.startswith("[xentlab] interrupted by SIGTERM in epoch") and str(run_dir) in line
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"


def test_ctrl_c_during_a_sweep_exits_130_with_one_line_and_the_resume_command(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([str(SCRIPT), "-m", *TINY, "trainer.max_epochs=500", "seed=0,1",
                                f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(sweep_dir.glob("*/checkpoints/last.ckpt")) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("xentlab-train: ")]
    assert line.startswith("xentlab-train: interrupted by SIGINT (Ctrl-C) in epoch")
    resume = ["xentlab-train", "-m", *TINY, "trainer.max_epochs=500", "seed=0,1", "hydra.sweep.dir=sweep",
              "ckpt_path=last"]  # the folder as given to the shell that runs it, here relative
    assert line.endswith(f"resume: {shlex.join(resume)}"), line
    (record,) = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert record["status"] == "interrupted"


def test_a_failed_single_run_is_recorded_with_its_error(tmp_path):
    with pytest.raises(FloatingPointError, match="train/loss is nan"):
        train(composed("optimizer.lr=1e30", "trainer.max_epochs=3"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed"
    assert record["error"].startswith("FloatingPointError: train/loss is nan")
    assert "Traceback" in record["traceback"] and record["config"]["optimizer"]["lr"] == 1e30


def test_a_diverged_run_is_flagged(tmp_path):
    # Adam at lr=1e6 stays finite but ends at a training loss ~1e5 times its starting one, at chance.
    (record,) = train(composed("optimizer.lr=1e6", "trainer.max_epochs=2"), tmp_path)
    assert record["status"] == "completed"
    assert any(w.startswith("diverged: the last epoch's training loss") for w in record["warnings"]), record
    (healthy,) = train(composed("trainer.max_epochs=2"), tmp_path / "healthy")
    assert healthy["warnings"] == []


@pytest.mark.parametrize(("initial", "losses", "flagged"), [
    (2.8, [2.9, 5.5, 8.0, 5.2], ["its first epoch's 2.9 (lowest of the 3 later epochs: 5.2)"]),
    (1.6, [1.42, 1.20, 0.97], []),
    (1.6, [1.637, 1.636], []),                       # slow, not diverged
    (1.6, [1.5e20, 2.0e5, 3.6e5], ["the last epoch's training loss 3.6e+05 is 2.25e+05x the loss before"]),
    (1.6, [1.4], []),                                # one epoch: rule (1) needs two
    (None, [3.0, 3.0], ["never fell below"]),
])
def test_divergence_rules(initial, losses, flagged):
    warnings = divergence_warnings(initial, losses)
    assert len(warnings) == len(flagged)
    for warning, fragment in zip(warnings, flagged, strict=True):
        assert warning.startswith("diverged: ") and fragment in warning


# --- SIGKILL in the middle of a parallel sweep, then resume ---------------------------------------------


def test_a_sweep_killed_with_sigkill_resumes_to_completion_with_every_record_intact(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.max_epochs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "seed=0", "threads=1,2,3", f"hydra.sweep.dir={sweep_dir}"]
    process = cli(args, tmp_path, start_new_session=True)  # its own process group: the joblib workers too
    try:
        deadline = time.monotonic() + 180
        while not list(sweep_dir.glob("*/metrics.json")) and process.poll() is None:
            assert time.monotonic() < deadline, "no job finished within 180 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers, wherever they are
        process.communicate(timeout=30)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}
    assert 1 <= len(finished) < 3, "the kill did not land mid-sweep"

    resumed = cli([*args, "ckpt_path=last"], tmp_path)
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "sweep report" in output
    folders = sorted(p.parent for p in sweep_dir.glob("*/.hydra"))
    assert [f.name for f in folders] == [f"threads={t}" for t in (1, 2, 3)]  # the swept key only
    for folder in folders:
        record = json.loads((folder / "metrics.json").read_text())
        assert record["status"] == "completed" and record["epochs"] == 2, folder.name
        # One job per folder: the record, its overrides and the checkpoint all describe the folder's job.
        assert f"threads={record['config']['threads']}" == folder.name and record["config"]["seed"] == 0
        overrides = [o for o in record["overrides"] if o.startswith("threads=")]
        assert overrides == [folder.name]
        checkpoint = load_checkpoint(folder / "checkpoints" / "last.ckpt")
        assert checkpoint["epoch"] == 1  # the second epoch, counted from 0
        assert config_differences(RunRecorder.config_in(checkpoint), record["config"]) == []
        if folder.name in finished:  # completed before the kill: not trained again
            assert (folder / "metrics.json").stat().st_mtime_ns == finished[folder.name]
    assert staging_files(sweep_dir) == []


# --- one writer per folder -------------------------------------------------------------------------------


def hydra_files(folder: Path) -> dict[str, bytes]:
    """What Hydra writes when a run or sweep starts: a refused second writer must leave these as they were."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in [*folder.glob("multirun.yaml"), *folder.rglob(".hydra/*")] if p.is_file()}


def test_a_second_writer_is_refused_while_the_first_runs_and_a_killed_one_leaves_no_lock(tmp_path):
    from xentlab.lab.lock import hold, release

    sweep_dir = tmp_path / "sweep"
    # Epochs enough that its first job is still running when the last refusal is tried, however fast the
    # machine (it is killed at the end).
    busy = "trainer.max_epochs=100000"
    first = cli(["-m", *TINY, busy, "seed=0,1", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list(sweep_dir.glob("*/checkpoints/last.ckpt")) and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        (job,) = [p.parent.parent for p in sweep_dir.glob("*/checkpoints/last.ckpt")]
        before = hydra_files(sweep_dir)
        # Another sweep into the folder, resuming it or not, and a single run into the running job's folder.
        for args in (["-m", *TINY, "trainer.max_epochs=2", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
                     ["-m", *TINY, busy, "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
                      "ckpt_path=last"],
                     [*TINY, busy, "seed=0", f"hydra.run.dir='{job}'", "ckpt_path=last"]):
            second = cli(args, tmp_path)
            output = second.communicate(timeout=120)[0]
            assert second.returncode == 2, output[-3000:]
            assert output.count("\n") == 1 and "is in use: another xentlab-train is writing there" in output
            assert first.poll() is None, "the first writer stopped"
        assert hydra_files(sweep_dir) == before
    finally:
        first.kill()  # SIGKILL: no chance to give the lock back; the kernel drops it with the process
        first.communicate(timeout=30)
    for folder in (sweep_dir, job):
        hold(folder)
        release(folder)


def test_a_resume_never_shrinks_what_a_folder_holds(tmp_path):
    train(composed("trainer.max_epochs=2"), tmp_path)
    held = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    shorter = composed("trainer.max_epochs=1", "ckpt_path=last")
    with pytest.raises(FolderHoldsAnotherRun, match=r"trained for 2 epochs; trainer\.max_epochs=1 would"):
        train(shorter, tmp_path)  # found by the completed record
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == held
    (tmp_path / "metrics.json").unlink()  # as after a SIGKILL: the checkpoint alone
    with pytest.raises(FolderHoldsAnotherRun, match=r"trained for 2 epochs; trainer\.max_epochs=1 would"):
        train(shorter, tmp_path)  # found by the checkpoint's epoch


def every_file(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("multirun", [False, True])
def test_a_refused_resume_or_fresh_start_leaves_every_file_of_its_folder_as_it_was(tmp_path, multirun):
    folder = tmp_path / "runs"
    mode, where = (["-m"], ["seed=0,1", f"hydra.sweep.dir={folder}"]) if multirun \
        else ([], [f"hydra.run.dir={folder}"])
    started = cli([*mode, *TINY, "trainer.max_epochs=2", *where], tmp_path)
    assert started.wait(timeout=240) == 0, started.communicate()[0][-3000:]
    before = every_file(folder)
    # A resume that would shrink the run, one of another configuration, and a fresh start over the run.
    for changed in (["trainer.max_epochs=1", "ckpt_path=last"], ["trainer.max_epochs=2", "loss=focal",
                    "ckpt_path=last"], ["trainer.max_epochs=3"]):
        resumed = cli([*mode, *TINY, *changed, *where], tmp_path)
        output = resumed.communicate(timeout=240)[0]
        assert resumed.returncode == 2, output[-3000:]
        assert every_file(folder) == before, changed


# --- a fresh start into a folder that holds a run ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> Path:
    """A single run (`single/`) and a seed batch (`batch/`), each completed in 2 epochs."""
    root = tmp_path_factory.mktemp("finished")
    for name, seeds in (("single", 1), ("batch", 2)):
        started = cli([*TINY, "trainer.max_epochs=2", f"seeds={seeds}", f"hydra.run.dir={root / name}"], root)
        assert started.wait(timeout=240) == 0, started.communicate()[0][-3000:]
    return root


@pytest.mark.parametrize(("folder", "seeds", "record"), [
    ("single", 1, "single/metrics.json"), ("single", 2, "single/metrics.json"),
    ("batch", 2, "batch/seed=0/metrics.json"), ("batch", 1, "batch/seed=0/metrics.json")])
def test_a_fresh_start_in_a_folder_holding_a_run_is_refused_before_anything_is_written(
        finished_runs, folder, seeds, record):
    run_dir = finished_runs / folder
    before = every_file(run_dir)
    line = refusal([*TINY, "trainer.max_epochs=3", f"seeds={seeds}", f"hydra.run.dir={run_dir}"],
                   finished_runs)  # overrides Hydra writes unlike the run's, to be put back
    assert f"{run_dir} already holds a run ({finished_runs / record} records a completed run of 2 epochs), " \
           "which a fresh start would overwrite: resume it with ckpt_path=last" in line
    assert "another folder (hydra.run.dir=" in line
    assert every_file(run_dir) == before  # the record, checkpoints, events and Hydra's files alike
    assert not list(run_dir.rglob("last-v*.ckpt"))


def test_a_finished_run_resumed_with_ckpt_path_last_is_not_trained_again(finished_runs):
    run_dir = finished_runs / "single"

    def results() -> dict[str, bytes]:  # all but what Hydra writes at every start
        return {name: data for name, data in every_file(run_dir).items()
                if not name.startswith(".hydra/") and not name.endswith(".log")}

    before = results()
    resumed = cli([*TINY, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", "ckpt_path=last"],
                  finished_runs)
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "[xentlab] completed: test balanced_accuracy" in output
    assert results() == before


def test_a_run_refused_while_it_was_built_is_rerun_in_its_folder(tmp_path):
    run_dir = tmp_path / "run"
    line = refusal([*TINY, "data.n_informative=100", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "data.n_informative=100 must be <= data.n_features" in line
    failed = json.loads((run_dir / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["epochs"] == 0
    rerun = cli([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], tmp_path)
    output = rerun.communicate(timeout=240)[0]
    assert rerun.returncode == 0, output[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["config"]["data"]["n_informative"] != 100
    assert "n_informative" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the rerun's own


@pytest.mark.parametrize(("record", "refused"), [
    ({"status": "completed", "epochs": 3}, "records a completed run of 3 epochs"),
    ({"status": "failed", "epochs": 1}, "records a run that failed after 1 epoch"),
    ({"status": "interrupted", "epochs": 2}, "records a run interrupted after 2 epochs"),
    ({"status": "failed", "epochs": 0}, None),  # refused while it was built: no result to keep
    ({"status": "interrupted", "epochs": 0}, None),  # stopped in its first epoch, before any checkpoint
    ({"status": "failed"}, None),  # a sweep job that failed before it trained (recorded by run_job)
    ("not a record", "is a record that cannot be read"),
])
def test_which_records_a_fresh_start_keeps(tmp_path, record, refused):
    from xentlab.lab.runs import FolderHoldsARun, check_fresh_start

    for folder in (tmp_path / "single", tmp_path / "batch" / "seed=1"):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(record))
    for run_dir in (tmp_path / "single", tmp_path / "batch"):
        if refused is None:
            check_fresh_start(composed(), run_dir)
        else:
            with pytest.raises(FolderHoldsARun, match=refused):
                check_fresh_start(composed(), run_dir)
        check_fresh_start(composed("ckpt_path=last"), run_dir)  # a resume is resume_point's to check
    (tmp_path / "batch" / "checkpoints").mkdir()
    (tmp_path / "batch" / "checkpoints" / "epoch=0-step=9.ckpt").write_bytes(b"")  # any checkpoint
    with pytest.raises(FolderHoldsARun, match=r"epoch=0-step=9\.ckpt is a run's checkpoint" if refused is None
                       else refused):
        check_fresh_start(composed(), tmp_path / "batch")
