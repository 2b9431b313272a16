"""Forward+backward of xentlab's Triton losses against PyTorch eager, torch.compile and Liger Kernel.

One run checks and times: every xentlab configuration is first compared with the plain-PyTorch reference on
the GPU (and plain cross-entropy is replayed from a captured CUDA graph), then each contender is timed:
forward + backward to the logits (`torch.autograd.grad(loss, logits)`: grad_output 1 as in
`loss.backward()`, without a leaf's .grad accumulation), median over repetitions, CUDA events, warm-up
first, L2 flushed and fresh logits before every repetition (Liger and xentlab's in-place variant overwrite
the logits). Each time is also given as a fraction of copy speed (`x.clone()` of the same logits timed the
same way in the same run: the fewest bytes any loss can move are one read of the logits and one gradient
write) and with its peak extra memory (torch.cuda.max_memory_allocated over forward+backward, minus what
was allocated before). xentlab's index-target losses read the logits twice (the forward's row statistics,
the backward's gradient sweep: phi and its slope run as the RowLoss's torch code between them) and write
the gradient once, so their own floor is 1.5 copies, 0.67 of copy speed; the goals below are judged
against that floor.

    python scripts/bench_gpu.py                  # all shapes and variants, check + times
    python scripts/bench_gpu.py --markdown       # the same, as tables for docs/benchmarks.md
    python scripts/bench_gpu.py --shapes 8192x128256 --variants ce,smooth --skip compile
    python scripts/bench_gpu.py --tune           # sweep the Triton launch configurations instead

xentlab is called through its Triton backend module directly: `xentlab.functional` adds argument checks
that read the targets on the host (a range check that must raise before any kernel), which is a device
synchronisation a training step pays once per call and a kernel benchmark should not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"8192x128256": (8192, 128256, torch.bfloat16), "32768x32000": (32768, 32000, torch.bfloat16),
          "65536x1000": (65536, 1000, torch.bfloat16), "262144x10": (262144, 10, torch.float32)}
VARIANTS = ("ce", "smooth", "weight", "focal", "ldam")
LDAM_SCALE = 30.0  # LDAM's s; the margins are 0.5 * weight / max(weight) (any per-class vector will do)
CONTENDERS = ("xentlab triton", "xentlab triton in-place", "PyTorch eager", "eager fp32 upcast",
              "torch.compile", "Liger Kernel")
FLUSH_BYTES = 256 << 20  # > H100/H200 L2 (50-60 MB)


@dataclass
class Result:
    shape: str
    variant: str
    contender: str
    ms: float | None
    copy_fraction: float | None
    extra_mb: float | None
    note: str = ""


# ------------------------------------------------------------------------------------- the contenders


def _focal_eager(x, y, gamma=2.0):
    """The usual PyTorch focal loss: -(1 - p_y)^gamma log p_y, mean over rows."""
    logpt = F.log_softmax(x, dim=1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logpt.exp()) ** gamma * logpt).mean()


def _eager(variant: str, weight: torch.Tensor, upcast: bool) -> Callable:
    def loss(x, y):
        x = x.float() if upcast else x
        if variant == "focal":
            return _focal_eager(x, y)
        if variant == "ldam":
            margin = (0.5 * weight / weight.max()).to(x.dtype)[y, None] * F.one_hot(y, x.shape[1]).to(x.dtype)
            return F.cross_entropy(LDAM_SCALE * (x - margin), y)
        w = weight.to(x.dtype) if variant == "weight" else None
        return F.cross_entropy(x, y, weight=w, label_smoothing=0.1 if variant == "smooth" else 0.0)

    return loss


def _xentlab(variant: str, weight: torch.Tensor, inplace: bool) -> Callable:
    import xentlab.kernels.triton as tx
    from xentlab.kernels.spec import NLL, LogitTransform

    ldam = LogitTransform(scale=LDAM_SCALE, margin=0.5 * weight / weight.max())

    def loss(x, y):
        if variant == "focal":
            return tx.focal_loss(x, y, 2.0, None, -100, "mean", inplace_backward=inplace)
        if variant == "ldam":
            return tx.softmax_loss(x, y, NLL(), None, ldam, -100, "mean", 0.0, inplace_backward=inplace)
        w = weight if variant == "weight" else None
        eps = 0.1 if variant == "smooth" else 0.0
        return tx.cross_entropy(x, y, w, -100, "mean", eps, inplace_backward=inplace)

    return loss


def _liger(variant: str, weight: torch.Tensor) -> Callable | str:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError as err:
        return f"not importable ({err.__class__.__name__})"
    if variant in ("focal", "ldam"):
        return f"no {variant} loss"

    def loss(x, y):
        w = weight if variant == "weight" else None
        return liger_cross_entropy(x, y, weight=w, label_smoothing=0.1 if variant == "smooth" else 0.0)

    return loss


def contenders(variant: str, weight: torch.Tensor, skip: set[str]) -> dict[str, Callable | str]:
    """Name -> loss function of (logits, targets), or a string saying why it is not run."""
    found: dict[str, Callable | str] = {
        "xentlab triton": _xentlab(variant, weight, inplace=False),
        "xentlab triton in-place": _xentlab(variant, weight, inplace=True),
        "PyTorch eager": _eager(variant, weight, upcast=False),
        "eager fp32 upcast": _eager(variant, weight, upcast=True),
        "torch.compile": torch.compile(_eager(variant, weight, upcast=False), dynamic=False),
        "Liger Kernel": _liger(variant, weight),
    }
    for name in found:
        if any(word in name.lower() for word in skip):
            found[name] = "skipped (--skip)"
    return found


# ------------------------------------------------------------------------------------------ measuring


def _fresh(x0: torch.Tensor, inplace: bool) -> torch.Tensor:
    leaf = x0.clone().requires_grad_()
    # the in-place variant refuses leaves; a view would get a new grad_fn when its data changes in place
    return leaf.clone() if inplace else leaf


def time_ms(step: Callable[[object], None], prepare: Callable[[], object], reps: int, warmup: int,
            flush: torch.Tensor) -> float:
    """Median milliseconds of `step(prepared)` between CUDA events; L2 flushed before each repetition."""
    events = []
    for i in range(warmup + reps):
        prepared = prepare()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(prepared)
        end.record()
        if i >= warmup:
            events.append((start, end))
        del prepared
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_extra_mb(step: Callable[[object], None], prepared: object) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(prepared)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn: Callable, x0, y, inplace: bool, args) -> tuple[float, float]:
    def step(x):
        torch.autograd.grad(fn(x, y), x)

    step(_fresh(x0, inplace))  # compiles (Triton, torch.compile) outside the measurements
    extra = peak_extra_mb(step, _fresh(x0, inplace))
    ms = time_ms(step, lambda: _fresh(x0, inplace), args.reps, args.warmup, args.flush)
    return ms, extra


def copy_ms(x0, args) -> float:
    return time_ms(lambda x: x.clone(), lambda: x0, args.reps, args.warmup, args.flush)


# ------------------------------------------------------------------------------------------- checking


def _grads(fn: Callable, x0, y, inplace: bool):
    x = _fresh(x0, inplace)
    loss = fn(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().double(), grad.double()


def check_variant(variant: str, x0, y, weight) -> list[str]:
    """Triton (new buffer and in-place) against the reference; returns the failures."""
    from xentlab.kernels import reference
    from xentlab.kernels.spec import NLL, LogitTransform

    ldam = LogitTransform(scale=LDAM_SCALE, margin=0.5 * weight / weight.max())
    ref = {"focal": lambda x, t: reference.focal_loss(x, t, 2.0, None, -100, "mean"),
           "ldam": lambda x, t: reference.softmax_loss(x, t, NLL(), None, ldam, -100, "mean", 0.0)}.get(
        variant, lambda x, t: reference.cross_entropy(x, t, weight if variant == "weight" else None, -100,
                                                      "mean", 0.1 if variant == "smooth" else 0.0))
    ref_loss, ref_grad = _grads(ref, x0, y, inplace=False)
    tol = 2e-2 if x0.dtype in (torch.bfloat16, torch.float16) else 1e-4
    failures = []
    for inplace in (False, True):
        loss, grad = _grads(_xentlab(variant, weight, inplace), x0, y, inplace)
        loss_err = abs(loss - ref_loss).item() / max(abs(ref_loss).item(), 1e-6)
        grad_err = (grad - ref_grad).abs().max().item() / max(ref_grad.abs().max().item(), 1e-30)
        status = "ok" if loss_err <= tol and grad_err <= tol else "FAIL"
        print(f"  check {variant:7s} in-place={inplace!s:5s} loss rel err {loss_err:.1e}, "
              f"gradient err / max|grad| {grad_err:.1e}: {status}", flush=True)
        if status != "ok":
            failures.append(f"{variant} in-place={inplace}")
    return failures


def check_cuda_graph(x0, y) -> list[str]:
    """Capture forward+backward of plain cross-entropy in a CUDA graph, replay it on new logits."""
    import xentlab.kernels.triton as tx
    from xentlab.kernels import reference

    static = x0.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static.grad = None
            tx.cross_entropy(static, y, None, -100, "mean", 0.0).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        loss = tx.cross_entropy(static, y, None, -100, "mean", 0.0)
        loss.backward()
    fresh = (torch.randn_like(x0, dtype=torch.float32) * 2).to(x0.dtype)
    with torch.no_grad():
        static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grad = _grads(lambda x, t: reference.cross_entropy(x, t, None, -100, "mean", 0.0), fresh, y,
                                False)
    tol = 2e-2 if x0.dtype in (torch.bfloat16, torch.float16) else 1e-4
    ok = (abs(loss.double() - ref_loss) <= tol * abs(ref_loss)).item() and (
        (static.grad.double() - ref_grad).abs().max() <= tol * ref_grad.abs().max()).item()
    print(f"  check CUDA-graph capture + replay of forward+backward: {'ok' if ok else 'FAIL'}", flush=True)
    del graph, static
    return [] if ok else ["cuda graph"]


# --------------------------------------------------------------------------------------------- report


def print_table(results: list[Result], markdown: bool) -> None:
    if markdown:
        print("| shape | variant | contender | ms | fraction of copy | peak extra MB |")
        print("|---|---|---|---|---|---|")
    for r in results:
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        frac = f"{r.copy_fraction:.2f}" if r.copy_fraction is not None else "-"
        mb = f"{r.extra_mb:.0f}" if r.extra_mb is not None else "-"
        if markdown:
            print(f"| {r.shape} | {r.variant} | {r.contender} | {ms} | {frac} | {mb} {r.note} |")
        else:
            print(f"{r.shape:12s} {r.variant:7s} {r.contender:24s} {ms:>9s} ms  {frac:>5s} of copy  "
                  f"{mb:>7s} MB extra  {r.note}")


def print_goals(results: list[Result], logits_mb: dict[str, float]) -> None:
    """The issue's goals, judged from this run's numbers only."""
    get = {(r.shape, r.variant, r.contender): r for r in results}
    print("\nGoals (this run):")
    floor = 2 / 3  # two reads and one write against a copy's one read and one write
    for shape, need in [("8192x128256", 0.80), ("32768x32000", 0.80), ("65536x1000", 0.50)]:
        r = get.get((shape, "ce", "xentlab triton"))
        if r and r.copy_fraction is not None:
            verdict = "met" if r.copy_fraction >= need * floor else "MISSED"
            print(f"  {shape}: {r.copy_fraction:.2f} of copy speed = {r.copy_fraction / floor:.2f} of the "
                  f"two-read floor, goal >= {need:.2f} of the floor: {verdict}")
    mine = get.get(("262144x10", "ce", "xentlab triton"))
    eager = get.get(("262144x10", "ce", "PyTorch eager"))
    if mine and eager and mine.ms and eager.ms:
        speedup = eager.ms / mine.ms
        verdict = "met" if speedup >= 3 else "MISSED"
        print(f"  262144x10: {speedup:.1f}x faster than eager, goal >= 3x: {verdict}")
    for shape in logits_mb:
        plain = get.get((shape, "ce", "xentlab triton"))
        for variant in VARIANTS[1:]:
            r = get.get((shape, variant, "xentlab triton"))
            if plain and r and plain.ms and r.ms:
                slower = r.ms / plain.ms - 1
                print(f"  {shape} {variant}: {slower:+.0%} vs plain CE, goal within +10%: "
                      f"{'met' if slower <= 0.10 else 'MISSED'}")
        for name, limit in [("xentlab triton", logits_mb[shape]), ("xentlab triton in-place", 0.0)]:
            r = get.get((shape, "ce", name))
            if r and r.extra_mb is not None:
                ok = r.extra_mb <= limit + 1.0 + 0.01 * logits_mb[shape]  # + partial sums and scalars
                print(f"  {shape} {name}: {r.extra_mb:.0f} MB extra, goal <= {limit:.0f} MB (+ small "
                      f"buffers): {'met' if ok else 'MISSED'}")


# -------------------------------------------------------------------------------------------- tuning


def tune(shape: str, x0, y, args) -> None:
    """Time plain CE over a grid of launch configurations (xentlab.kernels.triton._TUNING)."""
    import triton

    import xentlab.kernels.triton as tx

    n, c = x0.shape
    sms = torch.cuda.get_device_properties(x0.device).multi_processor_count
    width = triton.next_power_of_2(c)
    configs = [{}]  # the default; then whole rows in registers (4 to 64 elements per thread), then long rows
    configs += [{"rows": r, "block_c": width, "one_block": True, "num_warps": w}
                for r in (2**k for k in range(16)) if 512 <= r * width <= 32768
                for w in (4, 8, 16, 32) if 128 * w <= r * width <= 2048 * w]
    configs += [{"one_block": False, "block_c": b, "rows": 1, "num_warps": w, "max_programs": sms * k}
                for b in (2048, 4096, 8192, 16384) if b < width for w in (8, 16) for k in (1, 2, 4, 64)]
    base = copy_ms(x0, args)
    rows = []
    for config in configs:
        tx._TUNING.clear()
        tx._TUNING.update(config)
        try:
            ms, _ = measure(_xentlab("ce", None, False), x0, y, False, args)
            rows.append((ms, config))
        except Exception as err:  # a configuration the compiler rejects (e.g. out of resources)
            print(f"  {config}: {err.__class__.__name__}: {str(err)[:120]}")
    tx._TUNING.clear()
    print(f"\n{shape}: copy {base:.3f} ms; default config {tx.launch._softmax_config(c, x0.element_size())}")
    for ms, config in sorted(rows, key=lambda r: r[0]):
        print(f"  {ms:8.3f} ms  {base / ms:4.2f} of copy  {config or 'default'}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--skip", default="", help="comma-separated words; contenders whose name contains "
                        "one are not run (e.g. compile,upcast,liger)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-check", action="store_true", help="time without checking against the reference")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--tune", action="store_true", help="sweep launch configurations of plain CE instead")
    args = parser.parse_args(argv)
    for name, allowed in (("shapes", SHAPES), ("variants", VARIANTS)):
        chosen = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in chosen if v not in allowed]
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {list(allowed)}")
        setattr(args, name, chosen)
    args.skip = {w.strip().lower() for w in args.skip.split(",") if w.strip()}
    return args


def environment() -> str:
    import triton

    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:  # not installed
        liger = "not installed"
    props = torch.cuda.get_device_properties(0)
    return (f"GPU: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB); "
            f"torch {torch.__version__}, triton {triton.__version__}, liger-kernel {liger}")


def run_shape(shape: str, args, results: list[Result], failures: list[str]) -> float:
    n, c, dtype = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = (torch.randn(n, c, device="cuda", generator=gen) * 2).to(dtype)
    y = torch.randint(0, c, (n,), device="cuda", generator=gen)
    weight = torch.rand(c, device="cuda", generator=gen) + 0.5
    print(f"\n{shape} {str(dtype).replace('torch.', '')}", flush=True)
    if args.tune:
        tune(shape, x0, y, args)
        return 0.0
    if not args.no_check:
        for variant in args.variants:
            failures += [f"{shape} {f}" for f in check_variant(variant, x0, y, weight)]
        failures += [f"{shape} {f}" for f in check_cuda_graph(x0, y)]
    base = copy_ms(x0, args)
    results.append(Result(shape, "-", "copy (x.clone())", base, 1.0, x0.numel() * x0.element_size() / 2**20))
    for variant in args.variants:
        for name, fn in contenders(variant, weight, args.skip).items():
            if isinstance(fn, str):
                results.append(Result(shape, variant, name, None, None, None, fn))
                continue
            try:
                ms, extra = measure(fn, x0, y, "in-place" in name, args)
                results.append(Result(shape, variant, name, ms, base / ms, extra))
            except Exception as err:  # report the failing contender, keep timing the others
                results.append(Result(shape, variant, name, None, None, None, f"error: {err!s:.100}"))
            print_table(results[-1:], markdown=False)
            sys.stdout.flush()
            torch.cuda.empty_cache()
    return x0.numel() * x0.element_size() / 2**20


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and none is available (torch.cuda.is_available() is False); "
              "run it on a CUDA machine.", file=sys.stderr)
        return 2
    args.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    print(environment(), flush=True)
    results: list[Result] = []
    failures: list[str] = []
    logits_mb = {shape: run_shape(shape, args, results, failures) for shape in args.shapes}
    if args.tune:
        return 0
    print()
    print_table(results, args.markdown)
    print_goals(results, logits_mb)
    if args.json:
        payload = {"environment": environment(), "results": [asdict(r) for r in results],
                   "check_failures": failures}
        args.json.write_text(json.dumps(payload, indent=1))
    if failures:
        print(f"\nCHECK FAILED: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
