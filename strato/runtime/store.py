"""A node's object store: one shared-memory file per object, spilled to disk when full.

Writers (drivers, workers, pulls) create the file themselves and tell the agent it is
sealed; readers map it read-only. Spilling moves a file from shared memory to disk; a
reader that already mapped it keeps a valid mapping, and later readers look in both
places, so moving never breaks a get.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections import OrderedDict

from strato.runtime.serialization import SerializedValue, deserialize

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


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
        # one populate call instead of a page fault per 4 KiB page
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE) as mm:
            value.write_into(memoryview(mm))
    finally:
        os.close(fd)
    os.rename(path + ".tmp", path)
    return size


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


def read_object(paths: tuple[str, ...], oid: bytes):
    """Deserialize a stored object zero-copy; raises FileNotFoundError if absent."""
    mm = open_object(paths, oid)
    if mm is None:
        raise FileNotFoundError(oid.hex())
    return deserialize(mm)


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


class ObjectStore:
    """Accounting for one node's store directory, with LRU spilling past ``capacity``."""

    def __init__(self, shm_dir: str, spill_dir: str, capacity: int):
        self.shm_dir = shm_dir
        self.spill_dir = spill_dir
        self.capacity = capacity
        os.makedirs(shm_dir, exist_ok=True)
        os.makedirs(spill_dir, exist_ok=True)
        self._in_memory: OrderedDict[bytes, int] = OrderedDict()  # oid -> size (LRU order)
        self._spilled: dict[bytes, int] = {}
        self.used = 0
        self.spilled_bytes = 0

    @property
    def paths(self) -> tuple[str, str]:
        return (self.shm_dir, self.spill_dir)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._in_memory or oid in self._spilled

    def size_of(self, oid: bytes) -> int | None:
        return self._in_memory.get(oid, self._spilled.get(oid))

    def sealed(self, oid: bytes, size: int) -> None:
        """Account a file a writer finished, then spill older objects if over capacity."""
        if oid in self:
            return
        self._in_memory[oid] = size
        self.used += size
        self._spill_if_needed()

    def touch(self, oid: bytes) -> None:
        if oid in self._in_memory:
            self._in_memory.move_to_end(oid)

    def _spill_if_needed(self) -> None:
        while self.used > self.capacity and self._in_memory:
            oid, size = self._in_memory.popitem(last=False)
            src = object_path(self.shm_dir, oid)
            dst = object_path(self.spill_dir, oid)
            try:
                shutil.copyfile(src, dst + ".tmp")
                os.rename(dst + ".tmp", dst)
                os.unlink(src)
            except FileNotFoundError:
                self.used -= size
                continue
            self.used -= size
            self._spilled[oid] = size
            self.spilled_bytes += size

    def delete(self, oid: bytes) -> None:
        size = self._in_memory.pop(oid, None)
        if size is not None:
            self.used -= size
            _unlink(object_path(self.shm_dir, oid))
            return
        size = self._spilled.pop(oid, None)
        if size is not None:
            self.spilled_bytes -= size
            _unlink(object_path(self.spill_dir, oid))

    def open(self, oid: bytes):
        return open_object(self.paths, oid)

    def new_file(self, oid: bytes, size: int):
        """Create an empty file of ``size`` for a pull; returns (fd, tmp path)."""
        path = object_path(self.shm_dir, oid) + ".pull"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        return fd, path

    def finish_file(self, oid: bytes, tmp_path: str, size: int) -> None:
        os.rename(tmp_path, object_path(self.shm_dir, oid))
        self.sealed(oid, size)

    def clear(self) -> None:
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
