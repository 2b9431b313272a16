"""CPU benchmark: forward+backward time and peak extra memory, fused path vs PyTorch eager.

    python scripts/bench_cpu.py [--repeats 15] [--threads 2] [--shapes 8192x1000 ...] [--markdown out.md]

For each shape and loss it times `loss = f(x, target); loss.backward()` (median of `--repeats` runs after
warm-up) and measures the peak of extra CPU memory during one such step: the running sum of every allocation
minus every free that PyTorch's CPU allocator reports to the profiler (`profile_memory=True`), taken from the
moment x.grad is None until backward returns. That counts each temporary, saved tensor and the final x.grad,
for both sides alike. Eager baselines are `F.cross_entropy` and the usual PyTorch compositions.

Timings on a shared machine are only meaningful when it is otherwise idle: the fused path runs many short
parallel ops per call, and each waits for both intra-op threads, so a busy second core slows it far more than
eager's few long ops. The load average at start and end is printed with the table for that reason.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from xentlab import functional as XF
from xentlab.kernels import fused as fused_kernels

SHAPES = ((65536, 10), (8192, 1000), (1024, 32000))
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


def step(fn, x, target) -> float:
    x.grad = None
    start = time.perf_counter()
    fn(x, target).backward()
    return time.perf_counter() - start


def median_times(eager, fused, x, target, repeats: int) -> tuple[float, float]:
    """Median forward+backward seconds of both, run alternately so that load changes hit both alike."""
    for _ in range(2):
        step(eager, x, target), step(fused, x, target)
    times = [(step(eager, x, target), step(fused, x, target)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


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


def run(repeats: int, shapes):
    rows = []
    for shape in shapes:
        for name, (eager, fused, kind, goal) in CASES.items():
            x, target = make_inputs(shape, kind)
            t_eager, t_fused = median_times(eager, fused, x, target, repeats)
            m_eager = peak_extra_bytes(eager, x, target)
            # the fused path's reusable chunk workspace is allocated once and then persists: count it too
            m_fused = peak_extra_bytes(fused, x, target) + fused_kernels.workspace_bytes()
            rows.append((shape, name, t_eager, t_fused, m_eager, m_fused, goal))
    return rows


def verdict(t_eager, t_fused, m_eager, m_fused, goal) -> str:
    speed = "-" if goal is None else ("met" if t_eager / t_fused >= goal else "MISSED")
    memory = "met" if m_fused <= m_eager else "MISSED"
    return f"speed {speed}, memory {memory}"


def format_rows(rows):
    mib = 2.0**20
    for shape, name, t_e, t_f, m_e, m_f, goal in rows:
        goal_text = "-" if goal is None else f">= {goal:.2f}x"
        yield (f"{shape[0]}x{shape[1]}", name, f"{t_e * 1e3:.2f}", f"{t_f * 1e3:.2f}", f"{t_e / t_f:.2f}x",
               goal_text, f"{m_e / mib:.1f}", f"{m_f / mib:.1f}", f"{m_f / m_e:.2f}",
               verdict(t_e, t_f, m_e, m_f, goal))


HEADER = ("shape", "loss", "eager ms", "fused ms", "speed-up", "goal", "eager peak MiB", "fused peak MiB",
          "mem ratio", "verdict")


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} threads, torch {torch.__version__}, Python {platform.python_version()}"


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{c}" for n, c in SHAPES], help="NxC ...")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    before = load()
    rows = list(format_rows(run(args.repeats, shapes)))
    after = load()
    table = Table(*HEADER, title=f"fused vs eager, forward+backward, float32 — {machine()}",
                  caption=f"{before} at start, {after} at end")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    if args.markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        with open(args.markdown, "w") as f:
            f.write(f"Machine: {machine()}; {before} at start, {after} at end\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
