"""Small file habits shared across strato, each written once: where local state lives,
who owns it (the owner id), atomic writes, secret files (0600 from the first byte), an
advisory file lock, and a JSON record file guarded by that lock (provider claims, local
nodes)."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def strato_home() -> Path:
    """Where strato keeps local state: ``$STRATO_HOME``, default ``~/.strato``."""
    return Path(os.environ.get("STRATO_HOME") or Path.home() / ".strato").expanduser()


OWNER_FILE = "owner"
_OWNER_RE = re.compile(r"[a-z0-9_-]{1,63}")


def owner_id() -> str:
    """Who owns the clusters this ``$STRATO_HOME`` launches: ``<user>-<12 hex>``, random
    once and stable after (file ``owner``, 0600), lower-case ``[a-z0-9_-]`` so it is a
    valid tag and GCE label value. Nodes carry it beside the cluster name, so two users
    (or two homes) with the same cluster name never touch each other's nodes."""
    home = strato_home()
    path = home / OWNER_FILE
    with file_lock(home / f"{OWNER_FILE}.lock"):
        with contextlib.suppress(FileNotFoundError):
            value = path.read_text().strip()
            if _OWNER_RE.fullmatch(value):
                return value
        user = re.sub(r"[^a-z0-9_-]+", "-", getpass.getuser().lower()).strip("-")[:24]
        value = f"{user or 'user'}-{secrets.token_hex(6)}"
        write_secret(path, value + "\n")
        return value


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


def write_secret(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write a secret (key, token, spec with credentials): mode 0600 from creation, never
    readable by others for an instant; the directory is made 0700 if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data.encode() if isinstance(data, str) else data, mode=0o600,
                 fsync=False)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive advisory lock held on ``path`` (created if missing), across threads
    and processes of this machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked_json(path: Path, lock_path: Path, write: bool = False) -> Iterator[dict[str, Any]]:
    """A ``{"nodes": {...}}`` record file under an exclusive lock; written back when ``write``."""
    with file_lock(lock_path):
        state: dict[str, Any] = {"nodes": {}}
        if path.exists():
            state = json.loads(path.read_text() or '{"nodes": {}}')
        yield state
        if write:
            atomic_write(path, json.dumps(state, indent=2, sort_keys=True).encode(),
                         fsync=False)
