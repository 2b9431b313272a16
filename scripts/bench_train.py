"""Training and sweep speed: a xentlab run against a bare PyTorch loop, and a sweep sequential vs joblib.

    python scripts/bench_train.py [--samples 20000] [--epochs 20] [--repeats 3] [--threads 1]
                                  [--seeds 10] [--seed-repeats 2] [--sweep-repeats 1] [--skip-sweeps]

With the defaults the whole benchmark took 7 minutes on the project's shared 2-core machine at load
average ~3.5 (parts 1 and 2 ~3.5 min, part 3 ~3.5 min); `--skip-sweeps` leaves out part 3. It prints its
own total time at the end.

1. Overhead. In one process, with the same torch threads: `xentlab.lab.run.train` (Lightning fit with
   validation every epoch, test, TensorBoard logging and figures, checkpoints, metrics.json) against a
   bare loop doing the same arithmetic with the same data module, model, loss object, optimizer, batch
   size and epochs: train steps, a validation pass (loss + accuracy) per epoch and a test pass. Both
   sides build their data and model inside the timed region. Best of `--repeats` alternating runs, after
   one untimed warm-up of each, since the minimum is the figure least disturbed by other processes.
   Prints xentlab / bare, in wall time and in this process's CPU time (the steadier figure on a shared
   machine). As the third anchor, Lightning's own floor: a LightningModule that only
   applies the loss (no metrics, logging, figures or checkpoints), fitted and tested by a Trainer with
   the run's settings on the same data. `--threads` (default 1, as in xentlab's own runs) sets torch's
   threads here.
2. Seed batches. In the same process and with the same settings, `--seeds` seeds (default 10) of that
   run trained as one seed batch (`train` with `seeds=K`) against the same seeds trained one after
   another (`train`, one seed each); best of `--seed-repeats` alternating runs. Then where the time goes:
   the CPU time of each part of a run (figures, epoch metrics, checkpoints, builds, ...; timers wrapped
   around the functions that do them) in one single run and in one batch, and what each added seed of the
   batch costs in each part, (batch - single) / (K - 1).
3. Sweeps. `xentlab-train -m experiment=compare_losses` (6 losses × 10 seeds, one seed batch per loss)
   as a subprocess with the basic (sequential) launcher and with `hydra/launcher=joblib`, and with
   joblib without seed batches (`seeds=1 seed=range(10)`: the same 60 runs as 60 jobs): wall time of the
   whole command, report included, best of `--sweep-repeats` alternating runs, with the CPU time the
   command used.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table

import xentlab.lab.checkpoint
import xentlab.lab.metrics
import xentlab.lab.module
import xentlab.lab.run
from xentlab.lab.run import build_parts, quiet_lightning, train, trainer_arguments
from xentlab.lab.sweep import available_cpus
from xentlab.train import CONFIG_DIR


def config(samples: int, epochs: int, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config",
                       overrides=[f"data.n_samples={samples}", f"trainer.max_epochs={epochs}", *overrides])


def parts(cfg):
    """The run's data module, loss and model, built by xentlab's own `build_parts`."""
    torch.manual_seed(cfg.seed)
    return build_parts(cfg)


def timed(run):
    """`run(cfg)` returning (wall, CPU) seconds of it, CPU time being this process's."""
    def measured(cfg) -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        run(cfg)
        return time.perf_counter() - started, time.process_time() - cpu

    measured.__name__ = run.__name__
    return measured


@timed
def bare_loop(cfg) -> None:
    """The plain-PyTorch equivalent of one xentlab run (data and model built inside)."""
    data, loss_fn, model = parts(cfg)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    for _ in range(cfg.trainer.max_epochs):
        model.train()
        for x, y in data.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        evaluate(model, loss_fn, data.val_dataloader())
    evaluate(model, loss_fn, data.test_dataloader())


@torch.no_grad()
def evaluate(model, loss_fn, batches) -> tuple[float, float]:
    model.eval()
    total, correct, seen = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        total += float(loss_fn(logits, y)) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return total / seen, correct / seen


class LossOnly(pl.LightningModule):
    """The least a LightningModule can do: apply the loss in every step, and nothing else."""

    def __init__(self, model, loss_fn, optimizer):
        super().__init__()
        self.model, self.loss_fn, self.optimizer_factory = model, loss_fn, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.optimizer_factory(self.model.parameters())


@timed
def lightning_floor(cfg) -> None:
    """`LossOnly` fitted and tested by a Trainer with the run's settings, without logger or checkpoints
    (data and model built inside)."""
    data, loss_fn, model = parts(cfg)
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(**{**trainer_arguments(cfg), "enable_checkpointing": False}, logger=False,
                             default_root_dir=out)
        module = LossOnly(model, loss_fn, instantiate(cfg.optimizer))
        trainer.fit(module, datamodule=data)
        trainer.test(module, datamodule=data, verbose=False)


@timed
def xentlab_run(cfg) -> None:
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out)


def overhead(samples: int, epochs: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-`repeats` (wall, CPU) seconds of the xentlab run, the Lightning floor and the bare loop."""
    quiet_lightning()
    sides = {"xentlab": xentlab_run, "lightning": lightning_floor, "bare": bare_loop}
    warm = config(samples=400, epochs=1)
    with warnings.catch_warnings():  # the tiny warm-up run has fewer batches than the logging interval
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
        for run in sides.values():
            run(warm)
    cfg = config(samples, epochs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            times[name].append(run(cfg))
    return {name: (min(w for w, _ in pairs), min(c for _, c in pairs)) for name, pairs in times.items()}


def seed_batch(samples: int, epochs: int, seeds: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-`repeats` (wall, CPU) seconds of `seeds` seeds as one batch and as that many single runs in
    a row. The CPU time (this process's) is the steadier figure on a machine other work is using."""
    def batch() -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as out:
            train(config(samples, epochs, f"seeds={seeds}"), out)
        return time.perf_counter() - started, time.process_time() - cpu

    def one_by_one() -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as out:
                train(config(samples, epochs, f"seed={seed}"), out)
        return time.perf_counter() - started, time.process_time() - cpu

    quiet_lightning()
    with warnings.catch_warnings():  # the warm-up's logging-interval warning
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
        with tempfile.TemporaryDirectory() as out:
            train(config(400, 1, "seeds=2"), out)
    times: dict[str, list[tuple[float, float]]] = {"batch": [], "sequential": []}
    for _ in range(repeats):
        times["batch"].append(batch())
        times["sequential"].append(one_by_one())
    return {name: (min(w for w, _ in pairs), min(c for _, c in pairs)) for name, pairs in times.items()}


# The parts of a run timed by `parts_of_a_run`: (label, [(module or class, function name), ...]). None of
# these functions calls another of them, so their times add up.
PARTS = (
    ("figures and PR curves (last validation epoch, test)", [(xentlab.lab.module, "log_figures")]),
    ("loss-vs-p(true) figure and data description (start)",
     [(xentlab.lab.module.ClassifierModule, "on_fit_start")]),
    ("epoch metrics: folded, computed and logged", [(xentlab.lab.metrics.StageMetrics, "_tallied"),
                                                    (xentlab.lab.metrics.StageMetrics, "_values"),
                                                    (xentlab.lab.module.ClassifierModule, "_log")]),
    ("post-hoc fits at test", [(xentlab.lab.module, "posthoc_metrics")]),
    ("checkpoints written", [(xentlab.lab.checkpoint.SafeCheckpointIO, "save_checkpoint"),
                             (xentlab.lab.run, "split_checkpoint")]),
    ("data, loss and model built", [(xentlab.lab.run, "build_parts")]),
    ("module (metric objects) built", [(xentlab.lab.module.ClassifierModule, "__init__")]),
)


@contextlib.contextmanager
def parts_timed(spent: dict[str, float]):
    """Adds the CPU seconds spent in each of PARTS to `spent` while the block runs."""
    originals = []

    def timer(label, original):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - started
        return timed

    for label, functions in PARTS:
        for owner, name in functions:
            original = owner.__dict__[name]
            originals.append((owner, name, original))
            setattr(owner, name, timer(label, original))
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def parts_of_a_run(samples: int, epochs: int, seeds: int) -> dict[str, tuple[float, float]]:
    """CPU seconds of each part (and of the whole, "total") of one single run and one batch of `seeds`:
    label -> (single run, batch)."""
    times = []
    for count in (1, seeds):
        spent: dict[str, float] = {}
        with parts_timed(spent), tempfile.TemporaryDirectory() as out:
            cpu = time.process_time()
            train(config(samples, epochs, f"seeds={count}"), out)
            spent["total"] = time.process_time() - cpu
        times.append(spent)
    return {label: (times[0].get(label, 0.0), times[1].get(label, 0.0))
            for label in [label for label, _ in PARTS] + ["total"]}


def sweep_seconds(extra: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one `xentlab-train -m experiment=compare_losses`, child processes included."""
    script = Path(sys.executable).with_name("xentlab-train")
    with tempfile.TemporaryDirectory() as cwd:
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([str(script), "-m", "experiment=compare_losses", *extra], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)


def sweeps(repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall time (and its CPU time) per launcher over `repeats` alternating runs."""
    best: dict[str, tuple[float, float]] = {}
    launchers = (("sequential", []), ("joblib", ["hydra/launcher=joblib"]),
                 ("joblib, no batches", ["hydra/launcher=joblib", "seeds=1", "seed=range(10)"]))
    for _ in range(repeats):
        for name, extra in launchers:
            wall, cpu = sweep_seconds(extra)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    return best


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {available_cpus()} CPUs available, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
            f"load average {load:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for part 1")
    parser.add_argument("--seeds", type=int, default=10, help="seeds in the seed-batch comparison")
    parser.add_argument("--seed-repeats", type=int, default=2)
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--skip-sweeps", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    console = Console()
    console.print(machine(), soft_wrap=True)
    table = Table(title="xentlab training speed", title_justify="left")
    for column in ("measure", "seconds", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    best = overhead(args.samples, args.epochs, args.repeats)
    (bare, bare_cpu), (floor, floor_cpu), (run, run_cpu) = best["bare"], best["lightning"], best["xentlab"]
    table.add_row(f"bare PyTorch loop, {args.epochs} epochs on {args.samples} samples (CPU {bare_cpu:.2f} s)",
                  f"{bare:.2f}", "", "")
    table.add_row(f"Lightning floor: loss-only LightningModule, same Trainer settings "
                  f"(CPU {floor_cpu:.2f} s)", f"{floor:.2f}",
                  f"{floor / bare:.2f}× (CPU {floor_cpu / bare_cpu:.2f}×)", "")
    table.add_row(f"xentlab run, same work (CPU {run_cpu:.2f} s)", f"{run:.2f}",
                  f"{run / bare:.2f}× (CPU {run_cpu / bare_cpu:.2f}×)", "≤ 1.5×")
    table.add_row("xentlab run / Lightning floor", "", f"{run / floor:.2f}× (CPU {run_cpu / floor_cpu:.2f}×)",
                  "≤ 1.3×")
    k = args.seeds
    seeds = seed_batch(args.samples, args.epochs, k, args.seed_repeats)
    (one_by_one, one_by_one_cpu), (batch, batch_cpu) = seeds["sequential"], seeds["batch"]
    table.add_row(f"{k} seeds of that run, one after another (train; CPU {one_by_one_cpu:.1f} s)",
                  f"{one_by_one:.2f}", "", "")
    table.add_row(f"{k} seeds of that run as one seed batch (seeds={k}; CPU {batch_cpu:.1f} s)",
                  f"{batch:.2f}", f"{one_by_one / batch:.2f}× faster (CPU {one_by_one_cpu / batch_cpu:.2f}×)",
                  "≥ 4×")
    if k > 1:
        where = Table(title=f"where the CPU time goes: one run and one batch of {k} (one run of each)",
                      title_justify="left")
        for column in ("part", "single run, s", f"batch of {k}, s", "each added seed, s"):
            where.add_column(column, justify="left" if column == "part" else "right")
        parts = parts_of_a_run(args.samples, args.epochs, k)
        counted = [0.0, 0.0]
        for label, (single, batched) in parts.items():
            if label == "total":
                single, batched = single - counted[0], batched - counted[1]
                label = "the rest: training steps, validation and test passes, Lightning's loop"
            else:
                counted = [counted[0] + single, counted[1] + batched]
            where.add_row(label, f"{single:.2f}", f"{batched:.2f}", f"{(batched - single) / (k - 1):.3f}")
        single, batched = parts["total"]
        where.add_row("total", f"{single:.2f}", f"{batched:.2f}", f"{(batched - single) / (k - 1):.3f}")
    if not args.skip_sweeps:
        launchers = sweeps(args.sweep_repeats)
        (sequential, sequential_cpu), (parallel, parallel_cpu) = launchers["sequential"], launchers["joblib"]
        unbatched, unbatched_cpu = launchers["joblib, no batches"]
        table.add_row(f"compare_losses sweep (6 losses × 10 seeds: 6 seed batches), sequential "
                      f"(CPU {sequential_cpu:.0f} s)", f"{sequential:.1f}", "", "")
        table.add_row(f"compare_losses sweep, joblib (CPU {parallel_cpu:.0f} s)", f"{parallel:.1f}",
                      f"{sequential / parallel:.2f}× faster", "< 120 s")
        table.add_row(f"compare_losses sweep, joblib, no seed batches (60 jobs; CPU {unbatched_cpu:.0f} s)",
                      f"{unbatched:.1f}", f"batched {unbatched / parallel:.2f}× faster", "")
    console.print(table)
    if k > 1:
        console.print(where)
    console.print(f"load average after: {os.getloadavg()[0]:.1f}; benchmark took "
                  f"{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
