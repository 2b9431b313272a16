"""Checkpoint files: written atomically, read as data only (tensors and plain values, never pickled code),
carrying the random streams a resume needs to continue exactly (`RandomStates`)."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from xentlab.lab.atomic import atomic_open
from xentlab.lab.validation import ConfigError

# torch names the global a weights-only load refused: "Unsupported global: GLOBAL pkg.Class" for a class,
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" for a blocked module.
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
# torch's reason for refusing other pickle content, e.g. "Unsupported operand 149".
_UNSUPPORTED_CONTENT = re.compile(r"^\s*(Unsupported [^\n]+)$", re.MULTILINE)
# What Lightning needs of a checkpoint to continue a run from it.
LIGHTNING_KEYS = ("state_dict", "epoch", "global_step")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read as a checkpoint of this run; the message names the file. A
    ConfigError: `ckpt_path` (or the folder resumed) points at the wrong file."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """`torch.load(path, weights_only=True)`: tensors, containers and plain values only, as a dict.

    A checkpoint is untrusted input (docs/trust.md): unpickling arbitrary objects would run code, so
    this never falls back to `weights_only=False`. A missing, truncated (a crash or a full disk while it
    was written by an older tool), foreign or non-checkpoint file raises `CheckpointError` naming the
    file and what to do, without PyTorch's advice to retry unsafely. Whatever the loader raises on a
    damaged file (its unpickler fails in many ways on random bytes) is that error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found, content = _UNSUPPORTED_GLOBAL.search(str(error)), _UNSUPPORTED_CONTENT.search(str(error))
        detail = f" ({content.group(1).strip()})" if content else ""
        reason = (f"it holds a Python object ({found.group(1)}) beyond tensors and plain values, which "
                  "xentlab does not unpickle because loading it could run code" if found
                  else f"it is not a PyTorch checkpoint{detail}")
    except Exception as error:  # noqa: BLE001 - random bytes make the unpickler fail in any way
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "unexpected end of file"
        reason = f"it is truncated or damaged ({type(error).__name__}: {detail})"
    else:
        if isinstance(checkpoint, dict):
            return checkpoint
        reason = f"it holds a {type(checkpoint).__name__}, not a checkpoint's dict"
    raise CheckpointError(
        f"cannot read checkpoint {path}: {reason}. Delete it to start that run over, or point ckpt_path "
        "at another checkpoint file.")


def load_run_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """`load_checkpoint`, and the file must be a Lightning checkpoint (weights, epoch and step), so that
    a run never continues from a file that only looks like one."""
    checkpoint = load_checkpoint(path, map_location)
    missing = [key for key in LIGHTNING_KEYS if key not in checkpoint]
    if missing or not isinstance(checkpoint["state_dict"], dict):
        raise CheckpointError(
            f"cannot resume from checkpoint {path}: it is not a training checkpoint (it lacks "
            f"{', '.join(missing) or 'a state_dict of tensors'}). Delete it to start that run over, or point "
            "ckpt_path at another checkpoint file.")
    return checkpoint


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
        return load_run_checkpoint(path, map_location=map_location or "cpu")


def random_states() -> dict:
    """The process's random streams as plain values and tensors (a checkpoint is loaded weights-only):
    torch's CPU generator, every CUDA device's, numpy's global and Python's `random`."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                        float(gauss)]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    """Puts back what `random_states` took (the streams it holds; CUDA where present)."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStates(pl.Callback):
    """Carries the process's random streams (`random_states`: dropout and any other global draw) in every
    checkpoint, taken when it is written at an epoch's end, and puts them back when a resumed run starts
    training, so the epochs after the checkpoint draw what they drew in the run that was interrupted.
    With the data's own stream (`TensorDataModule.train_generator`) and Lightning's model, optimizer and
    loop state, a resume from an epoch's checkpoint trains exactly the epochs the uninterrupted run did."""

    def __init__(self) -> None:
        self._restored: dict | None = None

    def state_dict(self) -> dict:
        return random_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict  # applied when training starts: loading and sanity checks come first

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored is not None:
            set_random_states(self._restored)
            self._restored = None
