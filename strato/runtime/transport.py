"""Links between the head and node agents: in-process calls, or gRPC bidi streams.

Every link has ``send(msg)``; messages queued while a write is in flight leave together
in one Frame. gRPC links are mutual TLS against the cluster CA (``tls``), the only mode:
a plaintext client or one whose certificate another CA signed fails the handshake, so
nothing it sends is ever parsed. Calls also carry the cluster token (compared in
constant time); a wrong one is refused with UNAUTHENTICATED, before any frame is read.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import pickle

import grpc

from strato.exceptions import AuthenticationError
from strato.runtime import messages as m
from strato.runtime.protocol.runtime_pb2 import Frame
from strato.runtime.tls import CHANNEL_OPTIONS, Credentials

log = logging.getLogger("strato.transport")

SERVICE = "strato.Runtime"
TOKEN_KEY = "strato-token"
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 512 * 1024 * 1024),
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class PeerLostError(ConnectionError):
    """A peer request that can get no answer: the peer died, its link broke, or it did
    not answer in time."""


#: messages a link may hold for a peer that stopped reading (gRPC flow control holds
#: the writer) before the link is closed, as a broken one is: bounded memory, and the
#: requests waiting on that peer fail over instead of waiting on a queue that never moves
MAX_QUEUED = int(os.environ.get("STRATO_MAX_QUEUED_MESSAGES", "1000000"))


class _Batcher:
    """Collects messages and writes them as one Frame per wake-up of the writer task."""

    def __init__(self, write, on_overflow=None):
        self._write = write
        self._queue: list = []
        self._event = asyncio.Event()
        self.closed = False
        self._on_overflow = on_overflow
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, msg) -> None:
        if self.closed:
            return
        self._queue.append(msg)
        self._event.set()
        if len(self._queue) > MAX_QUEUED:
            log.warning("a link holds %d unsent messages (limit STRATO_MAX_QUEUED_MESSAGES): "
                        "closing it", len(self._queue))
            self._queue = []
            self.close()
            if self._on_overflow is not None:
                self._on_overflow()

    async def _run(self) -> None:
        try:
            while True:
                await self._event.wait()
                self._event.clear()
                if not self._queue:
                    continue
                batch, self._queue = self._queue, []
                await self._write(Frame(payload=pickle.dumps(batch, protocol=5)))
        except (asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError,
                ConnectionError, RuntimeError):
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self._task.cancel()


# ---------------------------------------------------------------------- in-process
class LocalLink:
    """Calls ``handler(msg)`` on the next loop iteration (head and agent in one process)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler):
        self._loop = loop
        self._handler = handler

    def send(self, msg) -> None:
        self._loop.call_soon(self._handler, msg)


def connect_in_process(head, agent) -> None:
    loop = asyncio.get_running_loop()
    to_agent = LocalLink(loop, agent.on_head_message)
    agent.head = LocalLink(loop, lambda msg: head.handle(to_agent, msg))


# ---------------------------------------------------------------------- server
class RuntimeServer:
    """The gRPC server of a node: ``Head`` (on the head node) and ``Peer`` streams."""

    def __init__(self, token: str, tls: Credentials, head=None, agent=None):
        self.token = token
        self.tls = tls
        self.head = head
        self.agent = agent
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        handlers = {
            "Auth": grpc.unary_unary_rpc_method_handler(
                self._auth, request_deserializer=Frame.FromString,
                response_serializer=Frame.SerializeToString),
            "Head": grpc.stream_stream_rpc_method_handler(
                self._head_stream, request_deserializer=Frame.FromString,
                response_serializer=Frame.SerializeToString),
            "Peer": grpc.stream_stream_rpc_method_handler(
                self._peer_stream, request_deserializer=Frame.FromString,
                response_serializer=Frame.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_secure_port(f"{host}:{port}", self.tls.server())
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port} (address in use?)")
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        if self.server:
            await self.server.stop(0.5)

    async def _check_token(self, context) -> None:
        md = dict(context.invocation_metadata() or ())
        given = md.get(TOKEN_KEY)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(),
                                                                 self.token.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "wrong cluster token: this cluster refused the connection "
                                "(pass the token printed by `strato start --head`)")

    async def _auth(self, request, context) -> Frame:
        """A unary check before any stream: a wrong token gets a clean UNAUTHENTICATED."""
        await self._check_token(context)
        return Frame(payload=b"head" if self.head is not None else b"node")

    async def _head_stream(self, request_iterator, context):
        await self._check_token(context)
        if self.head is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node is not the head")
        # a node that stops reading ends its stream (as a broken one): it re-registers
        batcher = _Batcher(context.write, on_overflow=asyncio.current_task().cancel)
        node_id = None
        try:
            async for frame in request_iterator:
                for msg in pickle.loads(frame.payload):
                    if msg[0] == m.REGISTER:
                        node_id = msg[1]
                    self.head.handle(batcher, msg)
        finally:
            batcher.close()
            self.head.link_closed(node_id)

    async def _peer_stream(self, request_iterator, context):
        await self._check_token(context)
        peer_node = None
        async for frame in request_iterator:
            for msg in pickle.loads(frame.payload):
                if msg[0] == m.PEER_HELLO:
                    peer_node = msg[1]
                    continue
                self.agent.peers.dispatch(peer_node, msg)


# ---------------------------------------------------------------------- clients
def secure_channel(address: str, tls: Credentials):
    return grpc.aio.secure_channel(address, tls.channel(), options=GRPC_OPTIONS + CHANNEL_OPTIONS)


async def open_stream(address: str, method: str, token: str, tls: Credentials):
    channel = secure_channel(address, tls)
    call = channel.stream_stream(f"/{SERVICE}/{method}", request_serializer=Frame.SerializeToString,
                                 response_deserializer=Frame.FromString)(
        metadata=((TOKEN_KEY, token),))
    return channel, call


async def check_auth(address: str, token: str, tls: Credentials, timeout: float) -> None:
    """Raise AuthenticationError for a wrong token, ConnectionError if nobody answers
    (a head whose certificate our CA did not sign never answers: the handshake fails)."""
    async with secure_channel(address, tls) as channel:
        auth = channel.unary_unary(f"/{SERVICE}/Auth", request_serializer=Frame.SerializeToString,
                                   response_deserializer=Frame.FromString)
        try:
            reply = await auth(Frame(), metadata=((TOKEN_KEY, token),), timeout=timeout,
                               wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthenticationError(f"cannot join the cluster at {address}: "
                                          f"{exc.details()}") from None
            raise ConnectionError(f"cannot reach the head at {address}: no answer within "
                                  f"{timeout:.0f}s ({exc.details()}); is `strato start --head` "
                                  "running there, the port open, and this node's TLS "
                                  "credentials (join bundle) from that cluster?") from None
    if reply.payload != b"head":
        raise ConnectionError(f"{address} is a strato node, not the head; pass the head's address")


class HeadLink:
    """An agent's stream to the head; the head's replies and broadcasts come back on it."""

    def __init__(self, address: str, token: str, agent, tls: Credentials):
        self.address = address
        self.token = token
        self.tls = tls
        self.agent = agent
        self.channel = None
        self.call = None
        self.batcher: _Batcher | None = None
        self.closed = asyncio.get_running_loop().create_future()

    async def connect(self, register_msg, timeout: float = 15.0) -> None:
        """Open the stream and register; raises AuthenticationError on a wrong token."""
        await check_auth(self.address, self.token, self.tls, timeout)
        self.channel, self.call = await open_stream(self.address, "Head", self.token, self.tls)
        self.batcher = _Batcher(self.call.write, on_overflow=self.call.cancel)
        self.batcher.send(register_msg)
        try:
            first = await asyncio.wait_for(self.call.read(), timeout)
        except grpc.aio.AioRpcError as exc:
            # the call's final status beats the read's error: a write racing the
            # server's abort can surface as INTERNAL first
            try:
                code, details = await asyncio.wait_for(
                    asyncio.gather(self.call.code(), self.call.details()), 5)
            except (asyncio.TimeoutError, grpc.aio.AioRpcError):
                code, details = exc.code(), exc.details()
            if grpc.StatusCode.UNAUTHENTICATED in (code, exc.code()):
                raise AuthenticationError(f"cannot join the cluster at {self.address}: "
                                          f"{details}") from None
            raise ConnectionError(f"cannot reach the head at {self.address}: {details}") from None
        except asyncio.TimeoutError:
            raise ConnectionError(f"the head at {self.address} did not answer within "
                                  f"{timeout:.0f}s") from None
        if first is grpc.aio.EOF:
            raise ConnectionError(f"the head at {self.address} closed the connection")
        for msg in pickle.loads(first.payload):
            self.agent.on_head_message(msg)
        asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                for msg in pickle.loads(frame.payload):
                    self.agent.on_head_message(msg)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result(True)

    @property
    def connected(self) -> bool:
        return self.batcher is not None and not self.batcher.closed and not self.closed.done()

    def send(self, msg) -> None:
        if self.batcher is not None:   # None while (re)connecting: the message is dropped
            self.batcher.send(msg)

    async def close(self) -> None:
        if self.batcher:
            self.batcher.close()
        if self.channel:
            await self.channel.close()


class PeerLinks:
    """An agent's outbound streams to other agents, opened on first use."""

    def __init__(self, agent, token: str, tls: Credentials):
        self.agent = agent
        self.token = token
        self.tls = tls
        self.links: dict[bytes, tuple] = {}   # node -> (channel, call, batcher)
        self.addresses: dict[bytes, str] = {}
        self._rid = itertools.count(1)
        self._requests: dict[int, tuple[bytes, asyncio.Future]] = {}   # rid -> (node, future)

    def send(self, node: bytes, msg) -> None:
        if node == self.agent.node_id:
            self.dispatch(node, msg)
            return
        link = self.links.get(node)
        if link is None:
            address = self.addresses.get(node)
            if address is None:
                log.warning("no address for node %s; dropping %s", node.hex()[:8], msg[0])
                return
            loop = asyncio.get_running_loop()
            queue: list = []
            link = (None, None, queue)
            self.links[node] = link
            loop.create_task(self._open(node, address, queue))
            queue.append(msg)
            return
        batcher = link[2]
        if isinstance(batcher, list):
            batcher.append(msg)
        else:
            batcher.send(msg)

    async def _open(self, node: bytes, address: str, queue: list) -> None:
        try:
            channel, call = await open_stream(address, "Peer", self.token, self.tls)
            batcher = _Batcher(call.write, on_overflow=call.cancel)
            batcher.send((m.PEER_HELLO, self.agent.node_id))
            for msg in queue:
                batcher.send(msg)
            self.links[node] = (channel, call, batcher)
            asyncio.get_running_loop().create_task(self._watch(node, call))
        except Exception as exc:  # peer unreachable: the head's view will mark it dead
            log.warning("cannot open a link to node %s at %s: %s", node.hex()[:8], address, exc)
            self.links.pop(node, None)
            self.fail_requests(node, f"cannot open a link to it: {exc}")

    async def _watch(self, node: bytes, call) -> None:
        try:
            await call.read()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        link = self.links.get(node)
        if link is not None and link[1] is call:
            self.links.pop(node, None)
            self.fail_requests(node, "its link closed")

    def request(self, node: bytes, msg, timeout: float | None = None) -> asyncio.Future:
        """Send a REQUEST; the future gets the REPLY's value, or ``PeerLostError`` when
        the node dies, its link breaks or ``timeout`` seconds pass without an answer."""
        rid = next(self._rid)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._requests[rid] = (node, fut)
        if timeout is not None:
            handle = loop.call_later(timeout, self._expire, rid, timeout)
            fut.add_done_callback(lambda _f: handle.cancel())
        self.send(node, (m.REQUEST, rid, self.agent.node_id, msg))
        return fut

    def _expire(self, rid: int, timeout: float) -> None:
        entry = self._requests.pop(rid, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(PeerLostError(
                f"node {entry[0].hex()[:8]} did not answer within {timeout:g}s"))

    def fail_requests(self, node: bytes, why: str) -> None:
        """Fail every request waiting on ``node`` at once (never wait on a dead peer)."""
        for rid, (n, fut) in list(self._requests.items()):
            if n == node:
                del self._requests[rid]
                if not fut.done():
                    fut.set_exception(PeerLostError(f"node {node.hex()[:8]}: {why}"))

    def dispatch(self, node: bytes | None, msg) -> None:
        kind = msg[0]
        if kind == m.REQUEST:
            _, rid, sender, inner = msg
            self.agent.on_peer_request(sender, inner,
                                       lambda value: self.send(sender, (m.REPLY, rid, value)))
            return
        if kind == m.REPLY:
            _, rid, value = msg
            entry = self._requests.pop(rid, None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(value)
            return
        self.agent.on_peer_message(node, msg)

    def forget(self, node: bytes) -> None:
        """``node`` died: close its link, fail what waits on it, drop its address."""
        self.fail_requests(node, "it died")
        link = self.links.pop(node, None)
        if link is not None and not isinstance(link[2], list):
            link[2].close()
        self.addresses.pop(node, None)
