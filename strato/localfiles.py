"""Small file habits shared across strato: where local state lives, atomic writes, and a
JSON record file guarded by a lock (provider claims, local nodes)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def strato_home() -> Path:
    """Where strato keeps local state: ``$STRATO_HOME``, default ``~/.strato``."""
    return Path(os.environ.get("STRATO_HOME") or Path.home() / ".strato").expanduser()


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600,
                 fsync: bool = True) -> None:
    """Write a whole file or nothing: readers see the old or the new content, never half."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked_json(path: Path, lock_path: Path, write: bool = False) -> Iterator[dict[str, Any]]:
    """A ``{"nodes": {...}}`` record file under an exclusive lock; written back when ``write``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state: dict[str, Any] = {"nodes": {}}
            if path.exists():
                state = json.loads(path.read_text() or '{"nodes": {}}')
            yield state
            if write:
                atomic_write(path, json.dumps(state, indent=2, sort_keys=True).encode(),
                             fsync=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
