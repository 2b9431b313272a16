"""CPU benchmark: forward+backward time and peak memory, fused path vs PyTorch eager; whole training steps.

    python scripts/bench_cpu.py [--repeats 15] [--threads 1] [--shapes 128x5 ...] [--compile] [--markdown f]

For each shape and loss it times `loss = f(x, target); loss.backward()` (the minimum over `--repeats`
alternating rounds of the contenders, each round timing a batch of calls sized to ~2 ms, so the noise of a
shared machine hits all alike and the minimum is the least disturbed figure) and measures the peak of extra
CPU memory during one such step: the running sum of every allocation
minus every free that PyTorch's CPU allocator reports to the profiler (`profile_memory=True`), taken from the
moment x.grad is None until backward returns. That counts each temporary, saved tensor and the final x.grad,
for both sides alike. Eager baselines are `F.cross_entropy` and the usual PyTorch compositions.

With one intra-op thread (`--threads 1`, the default) the clock is the calling thread's CPU time
(`time.thread_time`): all of PyTorch's work then runs on that thread, and time spent descheduled while other
processes use the cores is not counted, so the figures hold on a shared machine. With more threads the
clock is wall time, which is only meaningful on an otherwise idle machine (each short parallel op waits for
every intra-op thread); the load average at start and end is printed with the table for that reason.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from xentlab import functional as XF
from xentlab.kernels import fused as fused_kernels

# The shapes the lab trains on (N <= 4096, C <= 128) first, then the large ones where fusion pays.
TRAINING_SHAPES = ((128, 5), (1024, 5), (128, 10), (256, 100))
SHAPES = (*TRAINING_SHAPES, (65536, 10), (8192, 1000), (1024, 32000))
GAMMA, EPS = 2.0, 0.1


def eager_focal(x, y):
    logpt = torch.log_softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logpt.exp()) ** GAMMA * logpt).mean()


def eager_mse(x, y):
    return F.mse_loss(torch.softmax(x, 1), F.one_hot(y, x.shape[1]).float())


def eager_sigmoid_focal(x, t):
    # torchvision.ops.sigmoid_focal_loss, written out
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** GAMMA
    return ((0.25 * t + 0.75 * (1 - t)) * loss).mean()


# name -> (eager baseline, fused, target kind, speed goal as eager/fused ratio or None)
CASES = {
    "ce": (F.cross_entropy, lambda x, y: XF.cross_entropy(x, y, backend="fused"), "index", 1.0),
    "smoothed ce": (lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS),
                    lambda x, y: XF.cross_entropy(x, y, label_smoothing=EPS, backend="fused"), "index", 1.25),
    "focal": (eager_focal, lambda x, y: XF.focal_loss(x, y, gamma=GAMMA, backend="fused"), "index", 1.25),
    "mse (probs)": (eager_mse, lambda x, y: XF.mse_loss(x, y, backend="fused"), "index", 1.25),
    "bce": (F.binary_cross_entropy_with_logits,
            lambda x, t: XF.binary_cross_entropy_with_logits(x, t, backend="fused"), "multihot", None),
    "sigmoid focal": (eager_sigmoid_focal,
                      lambda x, t: XF.sigmoid_focal_loss(x, t, gamma=GAMMA, backend="fused"), "multihot",
                      None),
}


def make_inputs(shape, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen)).requires_grad_()
    if kind == "index":
        return x, torch.randint(0, shape[1], shape[:1], generator=gen)
    return x, (torch.rand(shape, generator=gen) < 0.1).float()


def clock() -> float:
    """Seconds on the benchmark's clock: this thread's CPU time when PyTorch runs on one thread, else wall."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def step(fn, x, target) -> float:
    x.grad = None
    start = clock()
    fn(x, target).backward()
    return clock() - start


def best_times(contenders, x, target, repeats: int) -> list[float]:
    """Minimum forward+backward seconds of each contender over `repeats` alternating rounds; a round times
    a batch of calls long enough (~2 ms) for the timer's resolution not to matter."""
    for fn in contenders:
        step(fn, x, target), step(fn, x, target)
    calls = max(1, int(2e-3 / max(step(contenders[0], x, target), 1e-7)))
    best = [float("inf")] * len(contenders)
    for _ in range(repeats):
        for i, fn in enumerate(contenders):
            start = clock()
            for _ in range(calls):
                step(fn, x, target)
            best[i] = min(best[i], (clock() - start) / calls)
    return best


def compiled(fn):
    """torch.compile of an eager baseline, or None where compiling fails here (no C++ compiler, ...)."""
    try:
        out = torch.compile(fn)
        x, y = make_inputs((8, 4), "index")
        out(x, y).backward()
        return out
    except Exception:  # any failure to compile means: no compiled anchor on this machine
        return None


def liger_ce():
    """Liger-Kernel's fused cross-entropy when importable (it is a Triton kernel: CUDA tensors only)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss()


def peak_extra_bytes(fn, x, target) -> int:
    """Peak of (allocated - freed) bytes over one forward+backward, from the allocator's profiler events."""
    step(fn, x, target)
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x, target).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def run(repeats: int, shapes, use_compile: bool):
    rows = []
    for shape in shapes:
        for name, (eager, fused, kind, goal) in CASES.items():
            x, target = make_inputs(shape, kind)
            anchor = compiled(eager) if use_compile else None
            contenders = [eager, fused] + ([anchor] if anchor is not None else [])
            times = best_times(contenders, x, target, repeats)
            m_eager = peak_extra_bytes(eager, x, target)
            # the fused path's reusable chunk workspace is allocated once and then persists: count it too
            m_fused = peak_extra_bytes(fused, x, target) + fused_kernels.workspace_bytes()
            t_compiled = times[2] if anchor is not None else None
            rows.append((shape, name, times[0], times[1], m_eager, m_fused, goal, t_compiled))
    return rows


# The default model's training step (MLP 20 -> 64 -> 64 -> 5, batch 128, Adam) with each loss: xentlab's
# built-in module against the same step with PyTorch's own loss (or the eager composition).
STEP_LOSSES = {
    "ce": ({}, F.cross_entropy),
    "focal": ({"gamma": GAMMA}, eager_focal),
    "label_smoothing": ({"smoothing": EPS}, lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS)),
    "mse": ({"on": "probs"}, eager_mse),
}


def training_steps(repeats: int):
    from xentlab.losses import build_loss

    gen = torch.Generator().manual_seed(0)
    features, labels = torch.randn(128, 20, generator=gen), torch.randint(0, 5, (128,), generator=gen)

    def make_step(loss_fn):
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                    torch.nn.ReLU(), torch.nn.Linear(64, 5))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def one(_x, _y):
            optimizer.zero_grad(set_to_none=True)
            value = loss_fn(model(features), labels)
            return value

        def train_step(x, y):  # step() calls fn(x, y).backward(); the optimizer step follows in the same call
            return _Stepped(one(x, y), optimizer)

        return train_step

    rows = []
    dummy = torch.zeros(1, requires_grad=True)
    for name, (params, torch_loss) in STEP_LOSSES.items():
        ours = build_loss(name, **params, backend="fused")
        t_torch, t_ours = best_times([make_step(torch_loss), make_step(ours)], dummy, None, repeats)
        rows.append((name, t_torch, t_ours))
    return rows


class _Stepped:
    """A loss whose backward() also takes the optimizer step, so `step` times a whole training step."""

    def __init__(self, value, optimizer):
        self.value, self.optimizer = value, optimizer

    def backward(self):
        self.value.backward()
        self.optimizer.step()


def verdict(t_eager, t_fused, m_eager, m_fused, goal) -> str:
    speed = "-" if goal is None else ("met" if t_eager / t_fused >= goal else "MISSED")
    memory = "met" if m_fused <= m_eager else "MISSED"
    return f"speed {speed}, memory {memory}"


def format_rows(rows):
    mib = 2.0**20
    for shape, name, t_e, t_f, m_e, m_f, goal, t_c in rows:
        if shape in TRAINING_SHAPES:  # goal: CE <= 1.0x eager's time, the compositions <= 0.8x
            composed = name in ("smoothed ce", "focal", "mse (probs)")
            goal = 1.0 if name == "ce" else (1.25 if composed else None)
        goal_text = "-" if goal is None else f">= {goal:.2f}x"
        compiled_text = "n/a" if t_c is None else f"{t_f / t_c:.2f}"
        yield (f"{shape[0]}x{shape[1]}", name, f"{t_e * 1e6:.1f}", f"{t_f * 1e6:.1f}", f"{t_f / t_e:.2f}",
               compiled_text, f"{t_e / t_f:.2f}x", goal_text, f"{m_e / mib:.2f}", f"{m_f / mib:.2f}",
               f"{m_f / m_e:.2f}", verdict(t_e, t_f, m_e, m_f, goal))


HEADER = ("shape", "loss", "eager µs", "fused µs", "fused/eager", "fused/compiled", "speed-up", "goal",
          "eager peak MiB", "fused peak MiB", "mem ratio", "verdict")
STEP_HEADER = ("loss", "PyTorch step µs", "xentlab step µs", "ratio", "goal <= 1.05")


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    timer = "thread CPU time" if threads == 1 else "wall time"
    return (f"{model}, {threads} threads ({timer}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add torch.compile of each eager baseline")
    parser.add_argument("--skip-steps", action="store_true", help="skip the whole-training-step table")
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{c}" for n, c in SHAPES], help="NxC ...")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    before = load()
    rows = list(format_rows(run(args.repeats, shapes, args.compile)))
    steps = [] if args.skip_steps else [(name, f"{a * 1e6:.0f}", f"{b * 1e6:.0f}", f"{b / a:.2f}",
                                         "met" if b / a <= 1.05 else "MISSED")
                                        for name, a, b in training_steps(args.repeats)]
    after = load()
    liger = "Liger-Kernel: " + ("importable, but its kernels need CUDA tensors" if liger_ce() is not None
                                else "not installed") + "; no CPU anchor from it"
    table = Table(*HEADER, title=f"fused vs eager, forward+backward, float32 — {machine()}",
                  caption=f"{before} at start, {after} at end")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    if steps:
        step_table = Table(*STEP_HEADER, title="one training step of the default model (MLP 20-64-64-5, "
                                                "batch 128, Adam): xentlab's loss vs PyTorch's")
        for row in steps:
            step_table.add_row(*row)
        Console(width=200).print(step_table)
    print(liger)
    if args.markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        if steps:
            lines += ["", "| " + " | ".join(STEP_HEADER) + " |", "|" + "---|" * len(STEP_HEADER)]
            lines += ["| " + " | ".join(row) + " |" for row in steps]
        lines += ["", liger]
        with open(args.markdown, "w") as f:
            f.write(f"Machine: {machine()}; {before} at start, {after} at end\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
