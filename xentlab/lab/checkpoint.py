"""Checkpoint files: written atomically, read as data only (tensors and plain values, never pickled code)."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO

from xentlab.lab.atomic import atomic_open

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a checkpoint; the message names the file."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """`torch.load(path, weights_only=True)`: tensors, containers and plain values only.

    A checkpoint is untrusted input (docs/trust.md): unpickling arbitrary objects would run code, so
    this never falls back to `weights_only=False`. A missing, truncated (a crash or a full disk while it
    was written by an older tool), foreign or non-checkpoint file raises `CheckpointError` naming the
    file and what to do, without PyTorch's advice to retry unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        reason = (f"it holds a Python object ({found.group(1)}) beyond tensors and plain values, which "
                  "xentlab does not unpickle because loading it could run code" if found
                  else "it is not a PyTorch checkpoint")
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        reason = f"it is truncated or damaged ({type(error).__name__}: {error or 'unexpected end of file'})"
    raise CheckpointError(
        f"cannot read checkpoint {path}: {reason}. Delete it to start that run over, or point ckpt_path "
        "at another checkpoint file.")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic saves (temporary file + fsync + rename in the same folder)
    and `load_checkpoint`'s data-only loading, whatever `weights_only` Lightning asks for."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first: torch.save straight to a file reports a full disk as a RuntimeError
        # ("unexpected pos ..."); a plain write raises OSError ENOSPC, which atomic_open names the file in.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_open(path, "wb") as file:
            file.write(buffer.getbuffer())

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path, map_location=map_location or "cpu")
