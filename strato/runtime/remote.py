"""The core worker of a remote driver: a process that is no node of the cluster (the
serverless client on a laptop) and reaches the head agent's client endpoint.

It cannot map the head's shared memory, so large values travel as raw chunks: ``put``
streams the serialized value's own buffers (no joined copy), and a ``get`` of an object
in a store receives it into one preallocated buffer that the value is then read from
zero-copy. When the connection drops it reconnects (a new tunnel, the same session) for
up to the head's grace period: the head kept the session's refs and calls, sends what
finished meanwhile (RESUMED), and gets in flight ask again.
"""

from __future__ import annotations

import mmap
import socket
import threading
import time
from collections.abc import Callable

from strato.exceptions import (
    AuthenticationError,
    HeadUnreachableError,
    ObjectLostError,
    VersionMismatchError,
)
from strato.runtime import messages as m
from strato.runtime.core import CoreWorker, ObjectRef
from strato.runtime.messages import AT_NODE, ERROR, INLINE
from strato.runtime.protocol.framing import FrameClient
from strato.runtime.serialization import serialize
from strato.runtime.spec import INLINE_MAX

DEFAULT_RECONNECT_S = 60.0
BYE_TIMEOUT_S = 2.0
_MMAP_FROM = 1 << 20


class RemoteCoreWorker(CoreWorker):
    """A driver's core worker over a connected client-endpoint socket (handshake done).

    ``reconnect`` returns a new such socket for the same session (None: never retry).
    """

    remote = True

    def __init__(self, sock: socket.socket, reconnect: Callable[[], socket.socket] | None = None,
                 reconnect_for: float = DEFAULT_RECONNECT_S):
        self._reconnect = reconnect
        self._reconnect_for = reconnect_for
        self._incoming: dict[bytes, list] = {}    # oid -> [buffer, bytes received]
        self._closing = False
        self._reconnecting = False
        self._connected = threading.Event()
        self._connected.set()
        super().__init__(None, "driver", sock=sock)

    def _open(self, sock: socket.socket) -> FrameClient:
        conn = FrameClient(sock, self._on_batch, self._on_close, on_raw=self._raw_target,
                           on_raw_done=self._raw_done)
        conn.start()
        conn.send((m.HELLO, self.role, self.client_id, None, b""))
        conn.prefix = self._take_ops   # after HELLO, which must come first
        return conn

    # ------------------------------------------------------------------ objects
    def put(self, value) -> ObjectRef:
        oid, sv, contained = self._serialize_for_put(value)
        size = sv.total_size
        if size <= INLINE_MAX:
            data = sv.to_bytes()
            self.values[oid] = (INLINE, data)
            self.send((m.PUT, oid, data, len(data), contained))
        else:
            self.values[oid] = (AT_NODE, self.node_id, size)
            while not self.conn.send_raw(oid, size, sv.segments(),
                                         (m.PUT, oid, None, size, contained)):
                self._wait_connected()   # the head restarts a partial upload at offset 0
        return ObjectRef(oid, self.node_id)

    def _raw_target(self, oid: bytes, offset: int, total: int, nbytes: int):
        state = self._incoming.get(oid)
        if state is None:
            if offset != 0:
                return None
            # anonymous memory: pages arrive zeroed as the data lands, no memset pass
            buf = mmap.mmap(-1, total) if total >= _MMAP_FROM else bytearray(total)
            state = self._incoming[oid] = [buf, 0]
        return memoryview(state[0])[offset:offset + nbytes]

    def _raw_done(self, oid: bytes, nbytes: int) -> None:
        state = self._incoming.get(oid)
        if state is None:
            return
        state[1] += nbytes
        if state[1] >= len(state[0]):
            del self._incoming[oid]
            self.wanted.discard(oid)
            if oid in self.refcounts:
                self.values[oid] = (INLINE, state[0])
            with self.cond:
                self.cond.notify_all()

    def _on_resumed(self, ready: list, pending: list) -> None:
        known = set(pending)
        for ret in ready:
            known.add(ret.oid)
            if ret.oid not in self.owned or ret.oid in self.values:
                continue
            if ret.error:
                self.values[ret.oid] = (ERROR, ret.inline)
            elif ret.inline is not None:
                self.values[ret.oid] = (INLINE, ret.inline)
            else:
                self.values[ret.oid] = (AT_NODE, ret.node, ret.size)
            tid = self.task_of.pop(ret.oid, None)
            if tid is not None:
                self.pinned.pop(tid, None)
        lost = serialize(ObjectLostError(
            "this call's submission was lost when the connection to the cluster dropped; "
            "call it again")).to_bytes()
        for oid in list(self.owned):
            if oid not in self.values and oid not in known:
                self.values[oid] = (ERROR, lost)

    def cancel_inflight(self) -> None:
        """Cancel this session's calls in flight (Ctrl-C); durable calls keep running."""
        if not self.conn.closed:
            self.conn.send((m.CANCEL_SESSION,))

    # ------------------------------------------------------------------ connection
    def send(self, msg) -> None:
        if self.conn.closed and not self._closing:
            self._wait_connected()
        super().send(msg)

    def rpc(self, method: str, *args, timeout: float = 60.0):
        try:
            return super().rpc(method, *args, timeout=timeout)
        except HeadUnreachableError:
            if self._closing or self._reconnect is None:
                raise
            self._wait_connected()
            return super().rpc(method, *args, timeout=timeout)

    def _wait_connected(self) -> None:
        self._connected.wait(self._reconnect_for + 35)
        if self.closed or self.conn.closed:
            raise HeadUnreachableError("lost the connection to the cluster and could not "
                                       f"reconnect within {self._reconnect_for:.0f}s")

    def _on_close(self) -> None:
        if self._closing or self._reconnect is None:
            self._connected.set()
            super()._on_close()
            return
        if self._reconnecting:
            return
        self._reconnecting = True
        self._connected.clear()
        threading.Thread(target=self._reconnect_loop, name="strato-reconnect",
                         daemon=True).start()

    def _reconnect_loop(self) -> None:
        deadline = time.monotonic() + self._reconnect_for
        delay = 0.1
        try:
            while not self._closing and time.monotonic() < deadline:
                try:
                    sock = self._reconnect()
                except (AuthenticationError, VersionMismatchError):
                    break
                except Exception:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self._incoming.clear()
                self.wanted.clear()
                self._welcome.clear()
                conn = self._open(sock)
                while not self._welcome.wait(0.1) and not conn.closed:
                    pass
                self.conn = conn
                if not conn.closed:
                    # ops sent just before the drop may be lost: register this
                    # session's borrows again (the head keeps them as a set)
                    for oid, owner in list(self.borrowed.items()):
                        self._add_op((m.REF_BORROWED, oid, owner))
                    return
            self.closed = True
        finally:
            self._reconnecting = False
            self._connected.set()
            with self.cond:
                self.cond.notify_all()

    def close(self) -> None:
        """A clean goodbye: the head ends the session now and cancels its calls."""
        self._closing = True
        conn = self.conn
        if not conn.closed:
            conn.send((m.BYE,))
            with self.cond:   # the head closes once the last output lines went out
                self.cond.wait_for(lambda: conn.closed, BYE_TIMEOUT_S)
        super().close()

