"""Length-prefixed frames of pickled message batches, for a node's own processes.

Each frame carries a *list* of messages, so whatever is queued goes out in one write.
Messages are tuples whose first item names the kind (see ``strato.runtime.messages``).
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
import threading
from collections.abc import Callable

_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 31


def encode(batch: list) -> bytes:
    body = pickle.dumps(batch, protocol=5)
    return _LEN.pack(len(body)) + body


class FrameProtocol(asyncio.BufferedProtocol):
    """asyncio side (node agent): parses frames and hands each batch to ``on_batch``."""

    def __init__(self, on_batch: Callable[[FrameProtocol, list], None],
                 on_close: Callable[[FrameProtocol], None]):
        self._on_batch = on_batch
        self._on_close = on_close
        self._buf = bytearray(1 << 16)
        self._start = 0
        self._end = 0
        self.transport: asyncio.Transport | None = None
        self._pending: list = []
        self._flush_scheduled = False
        self.closed = False
        self.peer: object = None  # set by the agent after the hello

    # reading --------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if len(self._buf) - self._end < 65536:
            if self._start:
                self._buf[: self._end - self._start] = self._buf[self._start:self._end]
                self._end -= self._start
                self._start = 0
            if len(self._buf) - self._end < 65536:
                self._buf.extend(bytes(len(self._buf)))
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes):
        self._end += nbytes
        buf = self._buf
        while self._end - self._start >= 4:
            (n,) = _LEN.unpack_from(buf, self._start)
            if self._end - self._start - 4 < n:
                if n + 4 > len(buf):
                    need = n + 4 - (len(buf) - self._start)
                    buf.extend(bytes(need + 65536))
                break
            body = bytes(buf[self._start + 4:self._start + 4 + n])
            self._start += 4 + n
            self._on_batch(self, pickle.loads(body))
        if self._start == self._end:
            self._start = self._end = 0
            if len(buf) > (1 << 22):
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

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and not self.closed:
            batch, self._pending = self._pending, []
            self.transport.write(encode(batch))


class FrameClient:
    """Blocking side (driver, worker): sends from any thread, a reader thread dispatches."""

    def __init__(self, sock: socket.socket, on_batch: Callable[[list], None],
                 on_close: Callable[[], None], name: str = "strato-io"):
        self.sock = sock
        self._on_batch = on_batch
        self._on_close = on_close
        self._send_lock = threading.Lock()
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
            try:
                self.sock.sendall(encode(msgs))
            except OSError:
                self.closed = True

    def _read_loop(self) -> None:
        sock = self.sock
        buf = bytearray()
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
                start = 0
                while len(buf) - start >= 4:
                    (n,) = _LEN.unpack_from(buf, start)
                    if len(buf) - start - 4 < n:
                        break
                    body = bytes(buf[start + 4:start + 4 + n])
                    start += 4 + n
                    self._on_batch(pickle.loads(body))
                if start:
                    del buf[:start]
        except OSError:
            pass
        except Exception:
            import traceback
            traceback.print_exc()
        finally:
            self.closed = True
            self._on_close()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
