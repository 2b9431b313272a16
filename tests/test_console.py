"""What `xentlab-train` shows a person at a terminal: refusals before the heavy imports, in one line and
with no run folder left behind; a progress bar only for a single run watched in a terminal; no Lightning
warning about the logging interval; a failed run's error, never its metrics."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["data=moons", "data.n_samples=200", "data.batch_size=32", "model.hidden_sizes=[8]",
        "trainer.max_epochs=1"]
HEAVY = ("torch", "pytorch_lightning", "lightning", "sklearn")

# Runs xentlab-train's main() and, at exit (after the refusal's sys.exit(2)), writes which of the heavy
# packages had been imported by then into the file named by the first argument.
WATCHING = f"""
import atexit, json, sys
seen, sys.argv = sys.argv[1], ["xentlab-train", *sys.argv[2:]]
atexit.register(lambda: open(seen, "w").write(json.dumps([m for m in {HEAVY!r} if m in sys.modules])))
from xentlab.train import main
main()
"""


def environment(**extra: str) -> dict:
    # No PYTHONWARNINGS=ignore: a warning Lightning prints must show up here as it would for a user.
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")},
            **extra}


def watched(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    seen = tmp_path / "imported.json"
    result = subprocess.run([sys.executable, "-c", WATCHING, str(seen), *overrides], cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=120)
    return result, json.loads(seen.read_text())


def assert_one_line_refusal(result: subprocess.CompletedProcess, fragment: str, tmp_path: Path) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("xentlab-train: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    # Nothing announces a run that never started (its folder, its class counts), and no folder is left.
    assert result.stdout == "", result.stdout
    assert [p for p in tmp_path.glob("outputs/*/*") if p.is_dir()] == []


WRONG_WHATEVER_THE_DATA = [
    # Settings a look at the config decides: no torch, no Lightning, no scikit-learn.
    (["data.imbalance_ratio=0"], "data.imbalance_ratio must be >= 1", []),
    (["data.imbalance_ratio=abc"], "data.imbalance_ratio must be a number", []),
    (["seed=abc"], "seed must be an integer, got 'abc'", []),
    (["data.name=imagenet"], "unknown dataset 'imagenet'; choose one of", []),
    (["data=moons", "+data.n_classes=3"], "dataset 'moons' has no parameter(s) n_classes", []),
    (["data.sampler=often"], "data.sampler must be one of instance", []),
    (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0", []),
    (["seeds=2", "data.imbalance_ratio=0"], "data.imbalance_ratio must be >= 1", []),
    # The loss is checked by building it (torch), for the dataset's task, still without Lightning.
    (["data=multilabel"], "loss 'ce' does not support multilabel data", ["torch"]),
    (["loss=focal", "loss.gamma=-1"], "loss 'focal': gamma", ["torch"]),
    (["seeds=2", "data=multilabel"], "loss 'ce' does not support multilabel data", ["torch"]),
    # Found once Lightning configured the optimizer, with a traceback and exit status 1, before.
    (["optimizer.lr=-1"], "optimizer.lr must be a finite number > 0", ["torch"]),
]


@pytest.fixture(scope="module")
def wrong_whatever_the_data(tmp_path_factory) -> dict[tuple[str, ...], dict]:
    """Each case of WRONG_WHATEVER_THE_DATA run once, in children forked from one process that has imported
    xentlab.train and nothing heavy, so each child imports what its own check needs."""
    return forked_runs(tmp_path_factory.mktemp("wrong"), [o for o, _, _ in WRONG_WHATEVER_THE_DATA], False)


@pytest.mark.parametrize(("overrides", "fragment", "loaded"), WRONG_WHATEVER_THE_DATA)
def test_a_setting_wrong_whatever_the_data_is_refused_before_lightning(wrong_whatever_the_data, overrides,
                                                                       fragment, loaded):
    run = wrong_whatever_the_data[tuple(overrides)]
    assert_one_line_refusal(run["result"], fragment, run["folder"])
    assert run["heavy"] == loaded


# Every bad setting of the audit that once gave a traceback, a late refusal or exit 0. Lightning's trainer
# values, unknown group choices and sweeps of bad values are decided from the config alone.
BEFORE_TORCH = [
    (["trainer.devices=0"], "trainer.devices must be a positive integer"),
    (["trainer.accelerator=tpu"], "trainer.accelerator must be one of auto, cpu, gpu, cuda, mps"),
    (["trainer.val_check_interval=abc"], "trainer.val_check_interval must be an integer >= 1"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be an integer >= 1"),
    (["trainer.precision=7"], "trainer.precision must be one of 64, 32, 16, bf16"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch must be an integer >= 1"),
    (["seeds=0"], "seeds (how many seeds to train together"),
    (["threads=0"], "threads must be a positive integer or null"),
    (["data.n_samples=30"], "leaves class 4 with 1 samples"),
    (["loss=focl"], "loss=focl: no such loss config; did you mean loss=focal? choose one of: asl,"),
    (["experiment=nope"], "experiment=nope: no such experiment config; choose one of: benchmark, calib"),
    (["-m", "loss=ce,foo"], "loss=foo: no such loss config; choose one of: asl,"),
    (["-m", "seeds=0,2"], "must be an integer >= 1, got 0 (in job seeds=0"),
    (["-m", "data.imbalance_ratio=1e9,10"], "data.imbalance_ratio=1000000000.0 leaves class 4 with 1"),
    (["-m", "data.n_samples=300,3000", "data.imbalance_ratio=10,100"],  # only 300 x 100 is wrong
     "data.imbalance_ratio=100 leaves class 4 with 2 samples"),
]
# Settings the loss (built with torch on the data's class count) or the metric code decides, still
# without Lightning: each run in a child forked from one process that has imported torch already.
WITH_TORCH = [
    (["loss=weighted_ce", "loss.weights=[1,2]"], "loss 'weighted_ce': weight must have shape (C,) = (5,)"),
    (["loss=weighted_ce", "loss.weights=[-1,1,1,1,1]"], "loss 'weighted_ce': weight must be finite and >= 0"),
    (["loss=focal", "loss.alpha=[1,2]"], "loss 'focal': alpha must have shape (C,) = (5,)"),
    (["loss=bce", "loss.pos_weight=[1,2]"], "loss 'bce': pos_weight must be a scalar or have shape (5,)"),
    (["data=digits", "loss=focal", "loss.alpha=[1,1,1,1,1]"], "alpha must have shape (C,) = (10,)"),
    (["-m", "loss=weighted_ce", "loss.weights=[1,1,1,1,1],[1,2]"], "weight must have shape (C,) = (5,)"),
    (["objective=val/nonexistent"], "objective 'val/nonexistent' is not a metric this run reports"),
    (["objective=test/ts_ecee"], "did you mean test/ts_ece?"),
    (["report.baseline=foo"], "report.baseline must be key=value pairs"),
    (['report.baseline="lost=ce"'], "report.baseline=lost=ce: lost is not a setting of this run"),
    (["report.baseline=lost=ce"], "mismatched input '=' expecting <EOF>"),  # Hydra's grammar, one line
    (["optimizer.lr=0"], "optimizer.lr must be a finite number > 0"),
    (["ckpt_path=last"], "ckpt_path=last: nothing to resume in"),
]

# Runs main() once per argument list, each in a child forked from this process after the imports the runs
# share (with torch: the loss and metric code too), with the child's stdout and stderr (file descriptors 1
# and 2, whatever writes to them) in <folder>/<n>.stdout and .stderr and its exit status and the heavy
# packages imported by then in <folder>/<n>.json: one start-up for many refusals.
FORKING = f"""
import json, os, sys, traceback
folder, runs, with_torch = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "torch"
if with_torch:
    __import__("torch").set_num_threads(1)  # a forked child must not wait on its parent's thread pool
    import xentlab.lab.metrics, xentlab.losses
from xentlab.train import main
for number, overrides in enumerate(runs):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(os.path.join(folder, str(number)))
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(os.path.join(folder, f"{{number}}.{{stream}}"), os.O_WRONLY | os.O_CREAT), fd)
        sys.argv = ["xentlab-train", *overrides]
        code = 0
        try:
            main()
        except SystemExit as stop:  # as the interpreter exits on it
            code = stop.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        with open(os.path.join(folder, f"{{number}}.json"), "w") as file:
            json.dump({{"code": code, "heavy": heavy}}, file)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def forked_runs(folder: Path, runs: list[list[str]], with_torch: bool) -> dict[tuple[str, ...], dict]:
    """{overrides: {"result": a CompletedProcess, "heavy": the heavy packages it imported, "folder": its
    working folder}} of each run of xentlab-train's main() with `overrides`, in children forked from one
    process (FORKING)."""
    for number in range(len(runs)):
        (folder / str(number)).mkdir(parents=True)
    subprocess.run([sys.executable, "-c", FORKING, str(folder), json.dumps(runs),
                    "torch" if with_torch else "plain"], env=environment(), check=True, timeout=300)
    found = {}
    for number, overrides in enumerate(runs):
        ended = json.loads((folder / f"{number}.json").read_text())
        stdout, stderr = ((folder / f"{number}.{stream}").read_text() for stream in ("stdout", "stderr"))
        result = subprocess.CompletedProcess(overrides, ended["code"], stdout, stderr)
        found[tuple(overrides)] = {"result": result, "heavy": ended["heavy"], "folder": folder / str(number)}
    return found


def refused_in_forks(folder: Path, cases: list[tuple[list[str], str]], with_torch: bool) -> list[dict]:
    runs = forked_runs(folder, [overrides for overrides, _ in cases], with_torch)
    for overrides, fragment in cases:
        run = runs[tuple(overrides)]
        assert_one_line_refusal(run["result"], fragment, run["folder"])
    return [runs[tuple(overrides)] for overrides, _ in cases]


def test_every_bad_setting_is_one_line_before_lightning(tmp_path):
    for overrides, result in zip(BEFORE_TORCH, refused_in_forks(tmp_path / "plain", BEFORE_TORCH, False),
                                 strict=True):
        assert result["heavy"] == [], (overrides, result["heavy"])
    for overrides, result in zip(WITH_TORCH, refused_in_forks(tmp_path / "torch", WITH_TORCH, True),
                                 strict=True):
        assert "pytorch_lightning" not in result["heavy"] and "lightning" not in result["heavy"], overrides


def test_help_imports_neither_torch_nor_lightning(tmp_path):
    result, imported = watched(tmp_path, "--help")
    assert result.returncode == 0 and "== Configuration groups ==" in result.stdout, result.stderr
    assert imported == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU the check looks for")
def test_a_missing_gpu_is_refused_before_lightning(tmp_path):
    result, imported = watched(tmp_path, "trainer=gpu")
    assert_one_line_refusal(result, "trainer.accelerator=gpu, but torch finds no CUDA GPU", tmp_path)
    assert "pytorch_lightning" not in imported and "lightning" not in imported


# Only the data (or the data's shape) can tell: these checks may import what building needs, and their refusal
# looks like any other.
REFUSED_WHILE_BUILDING = [
    # digits has 174 samples of its rarest digit: ratio 200 leaves the tail class none. A bundled
    # dataset cannot be given more samples: the advice names what can change.
    (["data=digits", "data.imbalance_ratio=200"],
     "leaves class 9 with 0 samples, fewer than data.min_class_samples=10; lower the ratio or "
     "data.min_class_samples (this dataset has no more samples)"),
    (["data=digits", "data.imbalance_ratio=200", "seeds=2"], "leaves class 9 with 0 samples"),
    # The data is built, the model refused: no class-count table before the refusal.
    (["model.hidden_sizes=abc"], "model.hidden_sizes must be a list of positive integers"),
]


@pytest.fixture(scope="module")
def refused_while_building(tmp_path_factory) -> dict[tuple[str, ...], dict]:
    """Each case of REFUSED_WHILE_BUILDING run once, in children forked from one process with torch."""
    return forked_runs(tmp_path_factory.mktemp("building"), [o for o, _ in REFUSED_WHILE_BUILDING], True)


@pytest.mark.parametrize(("overrides", "fragment"), REFUSED_WHILE_BUILDING)
def test_a_setting_refused_while_building_is_one_line_without_a_run_folder(refused_while_building, overrides,
                                                                           fragment):
    run = refused_while_building[tuple(overrides)]
    assert_one_line_refusal(run["result"], fragment, run["folder"])


def run_in_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """xentlab-train with stdout and stderr on a pseudo-terminal, as a person at a shell runs it."""
    controller, terminal = pty.openpty()
    script = Path(sys.executable).with_name("xentlab-train")
    process = subprocess.Popen([str(script), *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=terminal, env=environment(COLUMNS="120", TERM="xterm"))
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return process.wait(timeout=180), b"".join(chunks).decode(errors="replace")


def test_a_single_run_in_a_terminal_shows_a_progress_bar(tmp_path):
    code, shown = run_in_terminal(TINY, tmp_path)
    assert code == 0, shown
    # Lightning's rich bar (rich is installed): "Epoch 0/0 ━━━━ 4/4 0:00:00 • 0:00:00 158.89it/s".
    assert "Epoch 0/0" in shown and "4/4" in shown and "it/s" in shown, shown
    assert "logging interval" not in shown, shown


def test_a_multirun_in_a_terminal_shows_job_lines_and_a_failed_runs_error_not_its_metrics(tmp_path):
    # optimizer.lr=1e30 makes both seeds of the batch diverge: their runs are recorded as failed.
    code, shown = run_in_terminal(["-m", *TINY, "seeds=2", "optimizer.lr=1e30"], tmp_path)
    assert "Epoch 0" not in shown and "it/s" not in shown, shown
    lines = [line for line in shown.splitlines() if line.startswith("[1/1]")]
    assert len(lines) == 2 and all("FAILED: FloatingPointError" in line for line in lines), shown
    assert "balanced_accuracy" not in "".join(lines)


def test_a_run_without_a_terminal_has_no_bar_no_interval_warning_and_a_failed_run_shows_no_metrics(tmp_path):
    script = Path(sys.executable).with_name("xentlab-train")
    result = subprocess.run([str(script), *TINY, "seeds=2", "optimizer.lr=1e30"], cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=180)
    shown = result.stdout + result.stderr
    assert result.returncode == 1, shown  # runs that failed: recorded, printed, and a non-zero status
    assert "Epoch 0" not in shown and "it/s" not in shown, shown
    assert "logging interval" not in shown, shown
    failed = [line for line in result.stdout.splitlines() if line.startswith("[xentlab] failed:")]
    assert len(failed) == 2 and all("FloatingPointError" in line for line in failed), result.stdout
    assert not any("test " in line or "balanced_accuracy" in line for line in failed), failed
    records = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/*/*/seed=*/metrics.json")]
    assert sorted(r["status"] for r in records) == ["failed", "failed"]
