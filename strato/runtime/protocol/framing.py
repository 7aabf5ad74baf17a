"""Length-prefixed frames of pickled message batches, for a node's own processes.

Each frame carries a *list* of messages, so whatever is queued goes out in one write.
Messages are tuples whose first item names the kind (see ``strato.runtime.messages``).

A *raw* frame (length with the ``RAW`` bit set) carries one chunk of an object's bytes,
unpickled: ``(oid, offset, total size)`` then the data. Remote drivers (the serverless
client) move large objects so: the receiver reads the data straight into its final
buffer (a store file, a preallocated bytearray), never through pickle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable

_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 31
RAW = 1 << 31                              # length bit: a raw chunk frame
RAW_HEAD = struct.Struct("<16sQQ")         # oid, offset, total size
RAW_CHUNK = 4 * 1024 * 1024
_READ_BUF = 1 << 20
#: what a node's process may leave unread before the agent drops its connection (a
#: driver or worker that stopped reading must not grow the agent without bound)
MAX_UNREAD = int(os.environ.get("STRATO_MAX_UNREAD_MB", "1024")) << 20
log = logging.getLogger("strato.agent")


def encode(batch: list) -> bytes:
    body = pickle.dumps(batch, protocol=5)
    return _LEN.pack(len(body)) + body


def take_frames(buf: bytearray, max_frame: int = MAX_FRAME) -> list:
    """The messages of every whole frame at the start of ``buf``, removed from it (a
    partial frame stays). Raises ValueError for a frame over ``max_frame`` or a body
    that is no batch (pickle's own errors for one that is no pickle)."""
    out: list = []
    start = 0
    while len(buf) - start >= 4:
        (n,) = _LEN.unpack_from(buf, start)
        if n > max_frame:
            raise ValueError(f"a frame of {n} bytes (at most {max_frame})")
        if len(buf) - start - 4 < n:
            break
        batch = pickle.loads(memoryview(buf)[start + 4:start + 4 + n])
        if type(batch) is not list:
            raise ValueError("a frame that is no batch of messages")
        out += batch
        start += 4 + n
    if start:
        del buf[:start]
    return out


def raw_header(oid: bytes, offset: int, total: int, nbytes: int) -> bytes:
    """The header of a raw frame carrying ``nbytes`` of object ``oid`` at ``offset``."""
    return _LEN.pack(RAW | (RAW_HEAD.size + nbytes)) + RAW_HEAD.pack(oid, offset, total)


def chunks(segments: list, size: int = RAW_CHUNK):
    """Split a sequence of buffers into lists of views of at most ``size`` bytes each."""
    out: list = []
    room = size
    for seg in segments:
        view = memoryview(seg).cast("B") if not isinstance(seg, bytes) else memoryview(seg)
        while len(view):
            part = view[:room]
            out.append(part)
            view = view[len(part):]
            room -= len(part)
            if room == 0:
                yield out
                out, room = [], size
    if out:
        yield out


def recv_exactly(sock: socket.socket, n: int, closed: str = "the other side closed the "
                 "connection") -> bytes:
    """``n`` bytes from a blocking socket; ``ConnectionError(closed)`` if it ends first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(closed)
        got += k
    return bytes(buf)


def sendmsg_all(sock: socket.socket, buffers: list) -> None:
    """``sendall`` for a list of buffers (scatter-gather, no joining copy)."""
    views = [memoryview(b) for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while sent and views:
            n = len(views[0])
            if sent >= n:
                sent -= n
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


class FrameProtocol(asyncio.BufferedProtocol):
    """asyncio side (node agent): parses frames and hands each batch to ``on_batch``."""

    def __init__(self, on_batch: Callable[[FrameProtocol, list], None],
                 on_close: Callable[[FrameProtocol], None], on_raw: Callable | None = None):
        self._on_batch = on_batch
        self._on_close = on_close
        self._on_raw = on_raw   # (protocol, oid, offset, total, memoryview); None: refused
        self._buf = bytearray(1 << 16)
        self._start = 0
        self._end = 0
        self._need = 0     # bytes still missing of a frame bigger than the free room
        self.transport: asyncio.Transport | None = None
        self._pending: list = []
        self._flush_scheduled = False
        self.closed = False
        self.peer: object = None  # set by the agent after the hello

    # reading --------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        # resize only here: the loop (uvloop) holds the buffer during buffer_updated
        need = max(self._need, 65536)
        if len(self._buf) - self._end < need:
            if self._start:
                self._buf[: self._end - self._start] = self._buf[self._start:self._end]
                self._end -= self._start
                self._start = 0
            if len(self._buf) - self._end < need:
                self._buf.extend(bytes(need - (len(self._buf) - self._end)))
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes):
        self._end += nbytes
        buf = self._buf
        while self._end - self._start >= 4:
            (n,) = _LEN.unpack_from(buf, self._start)
            raw = n & RAW
            n &= ~RAW
            if self._end - self._start - 4 < n:
                self._need = n + 4 - (self._end - self._start)   # room get_buffer makes
                break
            self._need = 0
            if raw:
                if self._on_raw is None or n < RAW_HEAD.size:
                    self.transport.close()
                    return
                oid, offset, total = RAW_HEAD.unpack_from(buf, self._start + 4)
                with memoryview(buf) as view:
                    self._on_raw(self, oid, offset, total,
                                 view[self._start + 4 + RAW_HEAD.size:self._start + 4 + n])
                self._start += 4 + n
                if self.closed:
                    return
                continue
            body = bytes(buf[self._start + 4:self._start + 4 + n])
            self._start += 4 + n
            self._on_batch(self, pickle.loads(body))
        if self._start == self._end:
            self._start = self._end = 0
            if len(buf) > (1 << 23):
                self._buf = bytearray(1 << 16)

    def connection_lost(self, exc):
        self.closed = True
        self._on_close(self)

    # writing (batched per loop iteration) ---------------------------------
    def send(self, msg) -> None:
        if self.closed:
            return
        self._pending.append(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close(self) -> None:
        """Send what is queued, then close."""
        self._flush()
        self.transport.close()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and not self.closed:
            batch, self._pending = self._pending, []
            self.transport.write(encode(batch))
            if self.transport.get_write_buffer_size() > MAX_UNREAD:
                self._overflow()

    def _overflow(self) -> None:
        """The other side stopped reading: drop the connection (as if it had died)
        rather than buffer for it forever."""
        log.warning("a connection left %d MB unread (limit STRATO_MAX_UNREAD_MB=%d): "
                    "closing it", self.transport.get_write_buffer_size() >> 20,
                    MAX_UNREAD >> 20)
        self.closed = True
        self.transport.abort()


class FrameClient:
    """Blocking side (driver, worker): sends from any thread, a reader thread dispatches.

    Raw frames go to ``on_raw(oid, offset, total, nbytes)``, which returns the writable
    view to read the data into (None: discard it), then ``on_raw_done(oid, nbytes)``.
    """

    def __init__(self, sock: socket.socket, on_batch: Callable[[list], None],
                 on_close: Callable[[], None], name: str = "strato-io",
                 on_raw: Callable | None = None, on_raw_done: Callable | None = None):
        self.sock = sock
        self._on_batch = on_batch
        self._on_close = on_close
        self._on_raw = on_raw
        self._on_raw_done = on_raw_done
        self._send_lock = threading.Lock()
        # called under the send lock before every frame: a message to go first (the
        # core worker's reference-counting ops, which must precede what follows them)
        self.prefix: Callable[[], object] | None = None
        self._queue: list = []
        self.closed = False
        self._reader = threading.Thread(target=self._read_loop, name=name, daemon=True)

    def start(self) -> None:
        self._reader.start()

    def send(self, msg) -> None:
        self.send_many([msg])

    def send_many(self, msgs: list) -> None:
        """Send now; messages queued by other threads meanwhile ride in the same frame."""
        with self._send_lock:
            if self.closed:
                return
            prefix = self.prefix
            if prefix is not None:
                first = prefix()
                if first is not None:
                    msgs = [first, *msgs]
            try:
                self.sock.sendall(encode(msgs))
            except OSError:
                self.closed = True

    def try_flush(self, block: bool = True) -> None:
        """Send what ``prefix`` has now, if anything (``block=False``: unless another
        thread is sending, which sends it anyway)."""
        if not self._send_lock.acquire(block):
            return
        try:
            if self.closed or self.prefix is None:
                return
            first = self.prefix()
            if first is not None:
                try:
                    self.sock.sendall(encode([first]))
                except OSError:
                    self.closed = True
        finally:
            self._send_lock.release()

    def send_raw(self, oid: bytes, total: int, segments: list, then=None) -> bool:
        """Send an object's bytes (``segments``, ``total`` bytes in all) as raw frames,
        then the message ``then``, without another thread's frame in between."""
        with self._send_lock:
            if self.closed:
                return False
            try:
                first = self.prefix() if self.prefix is not None else None
                if first is not None:
                    self.sock.sendall(encode([first]))
                offset = 0
                for part in chunks(segments):
                    n = sum(len(p) for p in part)
                    sendmsg_all(self.sock, [raw_header(oid, offset, total, n), *part])
                    offset += n
                if then is not None:
                    self.sock.sendall(encode([then]))
            except OSError:
                self.closed = True
                return False
        return True

    def _read_loop(self) -> None:
        sock = self.sock
        buf = bytearray(_READ_BUF)
        view = memoryview(buf)
        start = end = 0
        try:
            while True:
                got = sock.recv_into(view[end:])
                if not got:
                    break
                end += got
                while end - start >= 4:
                    (n,) = _LEN.unpack_from(buf, start)
                    raw = n & RAW
                    n &= ~RAW
                    if raw:
                        if end - start < 4 + RAW_HEAD.size:
                            break
                        start, end = 0, self._read_raw(view, start, end, n)
                        continue
                    if end - start - 4 < n:
                        if n + 4 > len(buf):   # bigger than the buffer: a frame of its own
                            body = bytearray(n)
                            have = end - start - 4
                            body[:have] = view[start + 4:end]
                            self._recv_exactly(memoryview(body)[have:])
                            start = end = 0
                            self._on_batch(pickle.loads(body))
                        break
                    batch = pickle.loads(view[start + 4:start + 4 + n])
                    start += 4 + n
                    self._on_batch(batch)
                if start == end:
                    start = end = 0
                elif len(buf) - end < 65536 or start > len(buf) // 2:
                    view[:end - start] = view[start:end]
                    end -= start
                    start = 0
        except OSError:
            pass
        except Exception:
            import traceback
            traceback.print_exc()
        finally:
            self.closed = True
            self._on_close()

    def _read_raw(self, view: memoryview, start: int, end: int, n: int) -> int:
        """One raw frame: its data straight into the target view. What was buffered
        after it moves to the buffer's front; returns how many bytes that is."""
        oid, offset, total = RAW_HEAD.unpack_from(view, start + 4)
        size = n - RAW_HEAD.size
        dest = self._on_raw(oid, offset, total, size) if self._on_raw else None
        if dest is None:
            dest = memoryview(bytearray(size))
        pos = start + 4 + RAW_HEAD.size
        have = min(end - pos, size)
        dest[:have] = view[pos:pos + have]
        if have < size:
            self._recv_exactly(dest[have:])
        rest = end - (pos + have)
        if rest:
            view[:rest] = view[pos + have:end]
        if self._on_raw_done:
            self._on_raw_done(oid, size)
        return rest

    def _recv_exactly(self, dest: memoryview) -> None:
        got = 0
        while got < len(dest):
            n = self.sock.recv_into(dest[got:])
            if not n:
                raise OSError("connection closed in a frame")
            got += n

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
