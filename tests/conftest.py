"""Test-session set-up that must happen before any test module is imported."""

import os
import shutil

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and pytorch_lightning imports it, so it is set
# here, before any test module: without a GPU the Triton kernels then run in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread in the test process, as xentlab-train gives one job and xentlab.testing its toy
# tensors: the tests' tensors are tiny, and a second thread only adds a hand-off to every op, which on two
# busy cores grows to milliseconds (gradgradcheck of a 6x5 input ~6x slower). Runs the tests start as
# processes choose their own threads, as they do for users.
torch.set_num_threads(1)


@pytest.fixture(params=["tiny-chunks", "one-shot", "default-chunks"])
def chunking(request, monkeypatch):
    """Runs a test on each path of the fused backend: 5-element row chunks (no one-shot path for small
    inputs), so every multi-chunk path runs; the one-shot closed-form path that inputs of up to
    sizes.SMALL_ELEMS elements take; and the defaults (the smallest inputs take PyTorch's row kernels)."""
    from xentlab.kernels.fused import sizes

    if request.param != "default-chunks":
        monkeypatch.setattr(sizes, "TINY_ELEMS", 0)
    if request.param == "tiny-chunks":
        monkeypatch.setattr(sizes, "CHUNK_ELEMS", 5)
        monkeypatch.setattr(sizes, "SMALL_ELEMS", 0)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium, for the tests that open a page in a real browser; they skip without it
    (scripts/test.sh installs it as root on Debian). Start it with CHROMIUM_FLAGS."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    return found


# The flags that keep headless Chromium off the network and quiet on a machine without one.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
