"""The head agent's client endpoint: sessions of remote drivers (the serverless client).

Owns: the endpoint server (TCP on 127.0.0.1 only, reached through an SSH tunnel),
``sessions`` (session id -> ``Session``: a remote driver's client and job ids, kept for
a grace period after its connection drops, so a client that reconnects keeps its refs
and in-flight gets resume), ``incoming_puts`` (raw chunks of objects a client is
uploading, written straight into store files) and the streams of objects to clients.

A remote driver cannot map this node's shared memory: its large puts arrive as raw
chunks (``framing.RAW``), and its gets of objects in a store are streamed back as raw
chunks, a bounded window at a time. The first frame of every connection is the JSON
handshake (``protocol.handshake``): nothing is unpickled before it succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

from strato.exceptions import ObjectLostError
from strato.runtime import messages as m
from strato.runtime.agent.objects import ObjState, error_bytes
from strato.runtime.protocol import handshake
from strato.runtime.protocol.framing import RAW_CHUNK, FrameProtocol, raw_header
from strato.runtime.spec import ReturnValue

log = logging.getLogger("strato.agent")

DEFAULT_GRACE_S = 60.0
WRITE_HIGH_WATER = 8 * 1024 * 1024
BYE_LINGER_S = 0.05


@dataclass
class Session:
    session_id: str
    client_id: bytes
    job_id: bytes
    lost_at: float | None = None            # when its connection dropped; None: connected
    timer: asyncio.TimerHandle | None = None


class EndpointProtocol(FrameProtocol):
    """A client-endpoint connection: the JSON handshake first, then ordinary frames
    (and raw chunks); flow control so streamed objects never pile up in memory."""

    def __init__(self, agent):
        super().__init__(agent._on_client_batch, agent._on_client_close,
                         on_raw=agent._on_client_raw)
        self._agent = agent
        self.authed = False
        self.session_id: str | None = None
        self._writable: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._timer = asyncio.get_running_loop().call_later(
            handshake.HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        if not self.authed:
            self.transport.close()

    def buffer_updated(self, nbytes):
        if self.authed:
            super().buffer_updated(nbytes)
            return
        self._end += nbytes
        if self._end < 4:
            return
        n = int.from_bytes(self._buf[:4], "little")
        if n > handshake.MAX_HANDSHAKE:
            self.transport.close()   # garbage: no answer, nothing parsed
            return
        if self._end < 4 + n:
            return
        try:
            hello = json.loads(bytes(self._buf[4:4 + n]))
        except ValueError:
            self.transport.close()
            return
        answer, error = handshake.check(hello, self._agent.client_token,
                                        handshake.local_versions())
        if error is not None:
            log.warning("client endpoint: refused a connection: %s", error.splitlines()[0])
            self.transport.write(handshake.encode(answer))
            self.transport.close()
            return
        if self._timer:
            self._timer.cancel()
        answer["node_id"] = self._agent.node_id.hex()
        answer["grace_s"] = self._agent.client_grace
        self.transport.write(handshake.encode(answer))
        self.authed = True
        self.session_id = hello["session"]
        self._start = 4 + n
        super().buffer_updated(0)

    def connection_lost(self, exc):
        if self._timer:
            self._timer.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.authed:
            super().connection_lost(exc)
        else:
            self.closed = True

    def pause_writing(self):
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self):
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    def write_raw(self, oid: bytes, offset: int, total: int, data) -> None:
        """A raw chunk, after whatever messages are queued (their order is kept)."""
        if self.closed:
            return
        self._flush()
        self.transport.write(raw_header(oid, offset, total, len(data)))
        self.transport.write(data)


class ClientSessions:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_sessions(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.incoming_puts: dict[bytes, list] = {}   # oid -> [fd, tmp path, bytes, client]
        self.client_token: str | None = None
        self.client_port = 0
        self.client_grace = float(os.environ.get("STRATO_CLIENT_GRACE_S", DEFAULT_GRACE_S))
        self._endpoint: asyncio.AbstractServer | None = None

    async def start_client_endpoint(self, token: str, port: int = 0) -> int:
        """Listen for remote drivers on 127.0.0.1 only; returns the port."""
        self.client_token = token
        self._endpoint = await self.loop.create_server(
            lambda: EndpointProtocol(self), "127.0.0.1", port)
        self.client_port = self._endpoint.sockets[0].getsockname()[1]
        return self.client_port

    def stop_client_endpoint(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()

    # ------------------------------------------------------------------ sessions
    def _attach_session(self, client) -> bool:
        """A remote driver said hello; True when it resumed a session (no new job)."""
        sid = client.conn.session_id
        client.remote = True
        client.session = sid
        sess = self.sessions.get(sid)
        if sess is None or sess.client_id != client.client_id:
            self.sessions[sid] = Session(sid, client.client_id, client.job_id)
            return False
        client.job_id = sess.job_id
        if sess.timer is not None:
            sess.timer.cancel()
            sess.timer = None
        sess.lost_at = None
        old = self.clients.get(client.client_id)
        if old is not None and old.conn is not client.conn and not old.conn.closed:
            old.conn.transport.close()   # a half-dead connection it replaced
        ready, pending = [], []
        for oid, entry in self.objects.items():
            if entry.owner_client != client.client_id:
                continue
            if entry.state is ObjState.PENDING:
                pending.append(oid)
            elif entry.state in (ObjState.READY, ObjState.ERROR):
                ret_inline = entry.inline
                ready.append(ReturnValue(oid, ret_inline, entry.node, entry.size,
                                         entry.state is ObjState.ERROR))
        client.conn.send((m.RESUMED, ready, pending))
        log.info("client session %s resumed", sid[:8])
        return True

    def _session_lost(self, client) -> None:
        """The connection dropped without a goodbye: keep everything for the grace period."""
        sess = self.sessions.get(client.session)
        if sess is None:
            return
        sess.lost_at = time.time()
        sess.timer = self.loop.call_later(self.client_grace, self._end_session, sess.session_id)
        log.info("client session %s lost its connection; kept for %.0fs", sess.session_id[:8],
                 self.client_grace)

    def _end_session(self, sid: str) -> None:
        sess = self.sessions.get(sid)
        if sess is None or sess.lost_at is None:
            return
        del self.sessions[sid]
        log.info("client session %s ended (not back within %.0fs)", sid[:8], self.client_grace)
        self._job_over(sess.client_id, sess.job_id)

    def _session_closed(self, client) -> None:
        """A clean goodbye (or the grace ran out): its calls in flight are cancelled."""
        self.sessions.pop(client.session, None)
        if client.bye:
            self.on_cancel_session(client, (m.CANCEL_SESSION,))
        self._drop_incoming_puts(client.client_id)

    def on_bye(self, client, msg) -> None:
        """A clean goodbye: output its tasks printed just now still goes out (the pumps
        read it within a few ms), then the connection closes."""
        client.bye = True
        self.loop.call_later(BYE_LINGER_S, client.conn.close)

    def on_cancel_session(self, client, msg) -> None:
        """Cancel every call this client has in flight (durable calls are not its own)."""
        for task_id, (spec, _where) in list(self.owned_tasks.items()):
            if spec.owner_client == client.client_id:
                self._cancel(task_id, False)

    def client_activity(self) -> dict:
        """For the head's ``activity`` RPC: sessions connected or in their grace."""
        connected = sum(1 for s in self.sessions.values() if s.lost_at is None)
        return {"sessions": connected, "sessions_in_grace": len(self.sessions) - connected}

    # ------------------------------------------------------------------ objects in
    def _on_client_raw(self, conn, oid: bytes, offset: int, total: int, data) -> None:
        """A chunk of an object a remote driver puts: written into its store file."""
        client = conn.peer
        if client is None or not client.remote:
            conn.transport.close()
            return
        state = self.incoming_puts.get(oid)
        if state is not None and offset == 0:
            state[2] = 0   # sent again from the start after a reconnect
        elif state is None:
            if oid in self.store or offset != 0:
                return
            fd, tmp = self.store.new_file(oid, total)
            state = self.incoming_puts[oid] = [fd, tmp, 0, client.client_id]
        os.pwrite(state[0], data, offset)
        state[2] += len(data)
        if state[2] >= total:
            del self.incoming_puts[oid]
            os.close(state[0])
            if not self.store.finish_file(oid, state[1], total):
                self.refused_puts.add(oid)   # its PUT gets ObjectStoreFullError

    def _drop_incoming_puts(self, client_id: bytes) -> None:
        for oid, (fd, tmp, _n, owner) in list(self.incoming_puts.items()):
            if owner == client_id:
                del self.incoming_puts[oid]
                os.close(fd)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------------ objects out
    def _deliver_remote(self, client, oid: bytes, info: tuple,
                        owner_node: bytes | None = None) -> None:
        """A remote driver wants an object held in a store: pull it here, then stream."""
        if info[1] != self.node_id:
            self._pull(oid, info[1], info[2], lambda ok, err=None: (
                self.loop.create_task(self._stream_object(client, oid)) if ok
                else client.conn.send((m.OBJ, oid, m.ERROR, err))), owner_node)
            return
        self.loop.create_task(self._stream_object(client, oid))

    async def _stream_object(self, client, oid: bytes) -> None:
        conn = client.conn
        mm = self.store.open(oid)
        if mm is None:
            conn.send((m.OBJ, oid, m.ERROR, error_bytes(ObjectLostError(
                f"object {oid.hex()} is gone from the head's store"))))
            return
        self.store.touch(oid)
        view = memoryview(mm)
        total = len(view)
        for offset in range(0, max(total, 1), RAW_CHUNK):
            await conn.drain()
            if conn.closed:
                return
            conn.write_raw(oid, offset, total, view[offset:offset + RAW_CHUNK])
