"""Files written whole or not at all, so a crash or a full disk never leaves half a file under its name.

Standard library only: the report uses it too, and must not import torch or Lightning.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# The temporary name atomic_open writes under: `.<name>.<pid>.<8 hex digits>.tmp`.
_STAGING = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open `path` for writing so that readers see either its previous content or all of the new one.

    Writes go to a hidden temporary file beside `path` (a rename is atomic only within one file system);
    when the block ends it is flushed, fsync'ed and renamed over `path`. If anything fails, a full disk
    included, the temporary file is removed and the error propagates: no truncated file is left under
    either name. `mode` is "w" or "wb"; `kwargs` go to `open` (e.g. `encoding`).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # os.open with 0o666 lets the umask decide the permissions, as a plain open() would.
        with open(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode, **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            staging.unlink()
        if isinstance(error, OSError) and error.filename is None:  # a full disk's ENOSPC names no file
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically (see `atomic_open`); return the path."""
    with atomic_open(path, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def remove_staging_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that processes killed mid-write (SIGKILL, power loss) left in `folder`.

    Only for a folder no other process is writing to, e.g. a run's folder when the run is resumed.
    Returns the files removed.
    """
    stale = [p for p in Path(folder).iterdir() if _STAGING.match(p.name) and p.is_file()]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (some file systems and Windows refuse a folder fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
