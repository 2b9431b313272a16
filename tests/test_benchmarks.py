"""The benchmark scripts run end to end at toy sizes and print every row (their timings are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_bench_train_prints_the_bare_loop_the_lightning_floor_and_the_run():
    result = run_script("bench_train.py", "--skip-sweeps", "--repeats", "1", "--samples", "600",
                        "--epochs", "1", "--seeds", "2", "--seed-repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("bare PyTorch loop, 1 epochs on 600 samples", "Lightning floor", "xentlab run, same work",
                "2 seeds of that run, one after another", "2 seeds of that run as one seed batch"):
        assert row in result.stdout, result.stdout
    assert result.stdout.count("×") >= 2


def test_bench_cpu_prints_every_loss_at_a_small_shape():
    result = run_script("bench_cpu.py", "--repeats", "1", "--shapes", "64x10")
    assert result.returncode == 0, result.stderr[-3000:]
    for loss in ("ce", "smoothed ce", "focal", "mse (probs)", "bce", "sigmoid focal"):
        assert loss in result.stdout, (loss, result.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_refuses_to_run_without_cuda():
    result = run_script("bench_gpu.py")
    assert result.returncode == 2
    assert "CUDA" in result.stderr + result.stdout
