"""Turning values into bytes and back: cloudpickle + pickle protocol 5 out-of-band buffers.

A serialized value is a small pickle plus a list of raw buffers (numpy data, bytes). In
the object store they are laid out in one file, buffers 64-byte aligned, so a reader maps
the file and rebuilds arrays that point straight into shared memory (zero copy,
read-only).

A value that holds ObjectRefs says so in its header (``_MAGIC_REFS``): only such values
take the slower unpickler that tells the reader's core worker which refs it rebuilt (its
borrows, ``CoreWorker``); every other value is one ``pickle.loads``.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
from typing import Any

import cloudpickle

_ALIGN = 64
_HEADER = struct.Struct("<II")  # magic, number of buffers
_MAGIC = 0x5354524F
_MAGIC_REFS = 0x53545246   # the same layout; the pickle holds ObjectRefs
_LEN = struct.Struct("<Q")

_context = threading.local()


class SerializedValue:
    """A value ready to be written: the pickle, its out-of-band buffers, contained refs."""

    __slots__ = ("pickled", "buffers", "contained_refs", "total_size")

    def __init__(self, pickled: bytes, buffers: list[memoryview], contained_refs: list):
        self.pickled = pickled
        self.buffers = buffers
        self.contained_refs = contained_refs
        size = _HEADER.size + _LEN.size * (len(buffers) + 1) + len(pickled)
        for b in buffers:
            size = _align(size) + b.nbytes
        self.total_size = size

    def to_bytes(self) -> bytes:
        out = bytearray(self.total_size)
        self.write_into(memoryview(out))
        return bytes(out)

    def write_into(self, dest: memoryview) -> None:
        """Write the framed layout into ``dest`` (a bytearray or an mmap view)."""
        n = len(self.buffers)
        _HEADER.pack_into(dest, 0, _MAGIC_REFS if self.contained_refs else _MAGIC, n)
        pos = _HEADER.size
        _LEN.pack_into(dest, pos, len(self.pickled))
        pos += _LEN.size
        for b in self.buffers:
            _LEN.pack_into(dest, pos, b.nbytes)
            pos += _LEN.size
        dest[pos:pos + len(self.pickled)] = self.pickled
        pos += len(self.pickled)
        for b in self.buffers:
            pos = _align(pos)
            dest[pos:pos + b.nbytes] = b.cast("B") if b.format != "B" or b.ndim != 1 else b
            pos += b.nbytes


    def segments(self) -> list:
        """The framed layout as a list of buffers, to send without joining them (the
        buffers stay views of the value's own memory)."""
        n = len(self.buffers)
        head = bytearray(_HEADER.size + _LEN.size * (n + 1))
        _HEADER.pack_into(head, 0, _MAGIC_REFS if self.contained_refs else _MAGIC, n)
        _LEN.pack_into(head, _HEADER.size, len(self.pickled))
        for i, b in enumerate(self.buffers):
            _LEN.pack_into(head, _HEADER.size + _LEN.size * (i + 1), b.nbytes)
        out: list = [bytes(head) + self.pickled]
        pos = len(out[0])
        for b in self.buffers:
            pad = _align(pos) - pos
            if pad:
                out.append(bytes(pad))
            out.append(b.cast("B") if b.format != "B" or b.ndim != 1 else b)
            pos += pad + b.nbytes
        return out


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


#: values plain ``pickle`` handles alone (no code, no buffers, no refs): most small
#: results and arguments skip cloudpickle's setup, about 1.3 us each here
_PLAIN = frozenset((bytes, str, int, float, bool, type(None)))


def serialize(value: Any) -> SerializedValue:
    """Pickle ``value`` keeping large buffers out of band and noting the refs it holds."""
    if type(value) in _PLAIN:
        return SerializedValue(pickle.dumps(value, protocol=5), [], [])
    buffers: list[memoryview] = []
    refs: list = []
    prev = getattr(_context, "refs", None)
    _context.refs = refs
    try:
        pickled = cloudpickle.dumps(value, protocol=5,
                                    buffer_callback=lambda b: buffers.append(b.raw()))
    finally:
        _context.refs = prev
    return SerializedValue(pickled, buffers, refs)


def note_serialized_ref(ref) -> bool:
    """Called by ObjectRef.__reduce__ so the enclosing serialize() learns of nested refs;
    False when no serialize() is under way (a plain pickle the runtime cannot follow)."""
    refs = getattr(_context, "refs", None)
    if refs is None:
        return False
    refs.append(ref)
    return True


class _RefUnpickler(pickle.Unpickler):
    """Rebuilds ObjectRefs with the reader's own function (``rebuild``) instead of
    ``strato.runtime.core._rebuild_ref``: looked up once per value, not once per ref."""

    rebuild = None

    def find_class(self, module, name):
        if name == "_rebuild_ref" and module == "strato.runtime.core":
            return self.rebuild
        return super().find_class(module, name)


def deserialize(data, refs_hook=None, key=None) -> Any:
    """Rebuild a value from the framed layout; buffers stay views into ``data``.

    ``refs_hook(key)``, called only for a value that holds refs, returns the function
    that rebuilds each of them (``CoreWorker`` notes them as covered by ``key``)."""
    view = memoryview(data)
    magic, n = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC and magic != _MAGIC_REFS:
        raise ValueError("corrupt object: bad magic")
    pos = _HEADER.size
    (plen,) = _LEN.unpack_from(view, pos)
    pos += _LEN.size
    sizes = []
    for _ in range(n):
        sizes.append(_LEN.unpack_from(view, pos)[0])
        pos += _LEN.size
    pickled = view[pos:pos + plen]
    pos += plen
    buffers = []
    for size in sizes:
        pos = _align(pos)
        buffers.append(view[pos:pos + size])
        pos += size
    if magic == _MAGIC_REFS and refs_hook is not None:
        up = _RefUnpickler(io.BytesIO(pickled), buffers=buffers)
        up.rebuild = refs_hook(key)
        return up.load()
    return pickle.loads(pickled, buffers=buffers)


def picklable(value: Any) -> bool:
    """Whether ``value`` serializes (refs inside it are only noted, not kept)."""
    try:
        serialize(value)
        return True
    except Exception:
        return False


def dumps(value: Any) -> bytes:
    """Plain cloudpickle for code and small control payloads."""
    return cloudpickle.dumps(value, protocol=5)


loads = pickle.loads
