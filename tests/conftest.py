"""Test-session set-up that must happen before any test module is imported."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and pytorch_lightning imports it, so it is set
# here, before any test module: without a GPU the Triton kernels then run in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
