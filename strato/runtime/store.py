"""A node's object store: one shared-memory file per object, spilled to disk when full.

Writers (drivers, workers, pulls) create the file themselves and tell the agent it is
sealed; every sealed object (a put, a task result, a pulled copy) counts against the
capacity. Spilling moves a file from shared memory to disk, in a background thread so
the agent's loop never waits on the disk; a reader that already mapped it keeps a valid
mapping, and later readers look in both places, so moving never breaks a get. Spill
space has a limit too: an object that fits neither is refused (``sealed`` says so and
deletes it), and its owner gets an ``ObjectStoreFullError``.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import psutil

from strato.runtime.serialization import SerializedValue, deserialize


def object_path(directory: str, oid: bytes) -> str:
    return os.path.join(directory, oid.hex())


def write_object(directory: str, oid: bytes, value: SerializedValue,
                 reuse: str | None = None) -> int:
    """Write a serialized value as a store file; returns its size.

    ``reuse`` names a file nobody maps any more (see FilePool); writing into its
    already-allocated pages is several times faster than faulting in fresh ones.
    """
    path = object_path(directory, oid)
    size = value.total_size
    if reuse is not None:
        try:
            os.rename(reuse, path + ".tmp")
        except FileNotFoundError:
            reuse = None
    flags = os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_TRUNC)
    fd = os.open(path + ".tmp", flags, 0o600)
    try:
        os.ftruncate(fd, size)
        # pwritev of the value's own buffers: tmpfs fills fresh pages as it copies, 2-3x
        # faster than faulting (or populating, which zeroes them first) a mapping
        _pwrite_all(fd, value.segments())
    finally:
        os.close(fd)
    os.rename(path + ".tmp", path)
    return size


_IOV_MAX = 512


def _pwrite_all(fd: int, segments: list) -> None:
    """Write ``segments`` back to back from offset 0, whatever pwritev takes per call."""
    views = [memoryview(b).cast("B") for b in segments]
    offset, i = 0, 0
    while i < len(views):
        written = os.pwritev(fd, views[i:i + _IOV_MAX], offset)
        offset += written
        while i < len(views) and written >= views[i].nbytes:
            written -= views[i].nbytes
            i += 1
        if written:
            views[i] = views[i][written:]


def open_object(paths: tuple[str, ...], oid: bytes):
    """Map the object's file read-only from the first directory that has it; None if none."""
    name = oid.hex()
    for directory in paths:
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            size = os.fstat(fd).st_size
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
        finally:
            os.close(fd)
    return None


def read_object(paths: tuple[str, ...], oid: bytes, refs_hook=None, key=None):
    """Deserialize a stored object zero-copy; raises FileNotFoundError if absent.
    ``refs_hook``, ``key``: as ``deserialize`` takes them."""
    mm = open_object(paths, oid)
    if mm is None:
        raise FileNotFoundError(oid.hex())
    return deserialize(mm, refs_hook, key)


class FilePool:
    """Files of objects a client put and freed without ever sharing or reading them.

    Only such files are safe to overwrite: no other process was told about the object
    and no zero-copy view of it exists here. Bounded; the rest is unlinked.
    """

    def __init__(self, directory: str, max_files: int = 4, max_bytes: int = 1 << 30):
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._files: list[tuple[int, str]] = []
        self._n = 0

    def add(self, oid: bytes, size: int) -> None:
        src = object_path(self.directory, oid)
        if len(self._files) >= self.max_files or \
                size + sum(s for s, _ in self._files) > self.max_bytes:
            _unlink(src)
            return
        self._n += 1
        dst = os.path.join(self.directory, f"pool-{os.getpid()}-{self._n}")
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return
        self._files.append((size, dst))

    def take(self, size: int) -> str | None:
        """A pooled file of at least ``size`` bytes (and not wastefully larger)."""
        best = None
        for entry in self._files:
            if size <= entry[0] <= 2 * size + (1 << 20) and (best is None or entry[0] < best[0]):
                best = entry
        if best is None:
            return None
        self._files.remove(best)
        return best[1]

    def clear(self) -> None:
        for _, path in self._files:
            _unlink(path)
        self._files.clear()


def default_spill_limit(spill_dir: str) -> int:
    """``STRATO_OBJECT_SPILL_LIMIT`` bytes, else 90% of the disk space free there now."""
    raw = os.environ.get("STRATO_OBJECT_SPILL_LIMIT")
    if raw:
        return int(raw)
    probe = spill_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    return int(shutil.disk_usage(probe).free * 0.9)


_STORE_DIR = re.compile(r"^strato-(\d+)-[0-9a-f]{8}$")


def remove_dead_store_dirs(root: str = "/dev/shm") -> list[str]:
    """Remove this user's store dirs (``strato-<pid>-<node>``) whose node process is
    gone: a killed node never cleans up after itself. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        m = _STORE_DIR.match(e.name)
        if m is None:
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat().st_uid != os.getuid():
                continue
        except FileNotFoundError:
            continue
        if psutil.pid_exists(int(m.group(1))):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed


class ObjectStore:
    """Accounting for one node's store directory, with LRU spilling past ``capacity``
    into ``spill_dir`` (at most ``spill_limit`` bytes there)."""

    def __init__(self, shm_dir: str, spill_dir: str, capacity: int,
                 spill_limit: int | None = None):
        self.shm_dir = shm_dir
        self.spill_dir = spill_dir
        self.capacity = capacity
        os.makedirs(shm_dir, exist_ok=True)
        os.makedirs(spill_dir, exist_ok=True)
        self.spill_limit = default_spill_limit(spill_dir) if spill_limit is None else spill_limit
        self._in_memory: OrderedDict[bytes, int] = OrderedDict()  # oid -> size (LRU order)
        self._spilled: dict[bytes, int] = {}
        self.used = 0
        self.spilled_bytes = 0
        self._lock = threading.Lock()
        self._moving: set[bytes] = set()       # spills in flight (the spill thread's)
        self._dropped: set[bytes] = set()      # deleted while their spill was in flight
        self._spiller: ThreadPoolExecutor | None = None

    @property
    def paths(self) -> tuple[str, str]:
        return (self.shm_dir, self.spill_dir)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._in_memory or oid in self._spilled

    def size_of(self, oid: bytes) -> int | None:
        return self._in_memory.get(oid, self._spilled.get(oid))

    def sealed(self, oid: bytes, size: int) -> bool:
        """Account a file a writer finished, then spill older objects if over capacity.

        False (and the file deleted) when it fits neither in memory nor in spill space."""
        if oid in self:
            return True
        self._in_memory[oid] = size
        self.used += size
        self._spill_if_needed()
        if self.used > self.capacity and oid in self._in_memory:
            self.delete(oid)
            return False
        return True

    def full_message(self, size: int) -> str:
        mb = 1024 * 1024
        return (f"the object store has no room for an object of {size / mb:.1f} MB: "
                f"{self.used / mb:.0f} MB of {self.capacity / mb:.0f} MB in shared memory "
                f"(object_store_memory) and {self.spilled_bytes / mb:.0f} MB of "
                f"{self.spill_limit / mb:.0f} MB spilled to {self.spill_dir} (spill limit, "
                "STRATO_OBJECT_SPILL_LIMIT); free objects (drop refs) or raise the limits")

    def touch(self, oid: bytes) -> None:
        if oid in self._in_memory:
            self._in_memory.move_to_end(oid)

    def _spill_if_needed(self) -> None:
        """Move least recently used objects to spill space (files move in the spill
        thread; the accounting moves now), as long as spill space has room."""
        if self.used <= self.capacity:
            return
        for oid, size in list(self._in_memory.items()):
            if self.used <= self.capacity:
                break
            if self.spilled_bytes + size > self.spill_limit:
                continue   # a smaller, newer one may still fit
            del self._in_memory[oid]
            self.used -= size
            self._spilled[oid] = size
            self.spilled_bytes += size
            with self._lock:
                self._moving.add(oid)
            if self._spiller is None:
                self._spiller = ThreadPoolExecutor(1, thread_name_prefix="strato-spill")
            self._spiller.submit(self._move, oid)

    def _move(self, oid: bytes) -> None:
        """Spill thread: copy a file to spill space, then unlink it from shared memory."""
        src = object_path(self.shm_dir, oid)
        dst = object_path(self.spill_dir, oid)
        try:
            shutil.copyfile(src, dst + ".tmp")
            os.rename(dst + ".tmp", dst)
        except OSError:   # gone already (deleted), or the disk failed: it stays in memory
            _unlink(dst + ".tmp")
            with self._lock:
                self._moving.discard(oid)
                dropped = oid in self._dropped
                self._dropped.discard(oid)
            if dropped:
                _unlink(src)
            return
        with self._lock:
            self._moving.discard(oid)
            dropped = oid in self._dropped
            self._dropped.discard(oid)
        _unlink(src)
        if dropped:
            _unlink(dst)

    def spills_in_flight(self) -> int:
        with self._lock:
            return len(self._moving)

    def delete(self, oid: bytes) -> None:
        size = self._in_memory.pop(oid, None)
        if size is not None:
            self.used -= size
            _unlink(object_path(self.shm_dir, oid))
            return
        size = self._spilled.pop(oid, None)
        if size is not None:
            self.spilled_bytes -= size
            with self._lock:
                if oid in self._moving:
                    self._dropped.add(oid)   # the spill thread removes both files
                    return
            _unlink(object_path(self.spill_dir, oid))

    def open(self, oid: bytes):
        return open_object(self.paths, oid)

    def new_file(self, oid: bytes, size: int):
        """Create an empty file of ``size`` for a pull; returns (fd, tmp path)."""
        path = object_path(self.shm_dir, oid) + ".pull"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        return fd, path

    def finish_file(self, oid: bytes, tmp_path: str, size: int) -> bool:
        os.rename(tmp_path, object_path(self.shm_dir, oid))
        return self.sealed(oid, size)

    def clear(self) -> None:
        if self._spiller is not None:
            self._spiller.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
