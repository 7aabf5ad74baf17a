"""Objects between nodes on a channel of their own: mutual TLS sockets, whole objects.

The gRPC links carry messages; an object pulled from another node through them went
through several fresh copies per 4 MB chunk (slice, pickle, protobuf, and back), and
both sides took turns. Here a pull is one request on a TLS connection to the holder's
bulk port and the object's bytes stream back from a mapping of its store file into
the puller's new store file: ``recv_into`` a 1 MB buffer of the pulling thread, then
``pwrite`` to the file. One encryption, one decryption, no Python-level copy; the
buffer stays in cache, and ``pwrite`` fills the new file's pages without a page fault
each and without zeroing them first (receiving into a mapping of the new file took
about a fifth more of the puller's CPU for 100 MB, and 13% more for 1 MB objects, mostly
in those faults). TCP_NODELAY on both ends (see ``_no_delay``). Blocking sockets in
threads, so the event loops of both agents stay free (OpenSSL and the socket calls
release the GIL).

The channel is as closed as the gRPC port: the cluster CA's certificates on both ends
(no handshake, no byte read), then the cluster token compared in constant time before
any request is parsed. A request names a 16-byte object id, never a path.
"""

from __future__ import annotations

import hmac
import logging
import mmap
import os
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable

from strato.localfiles import write_secret
from strato.runtime.bounded import BoundedSet
from strato.runtime.protocol.framing import recv_exactly
from strato.runtime.tls import SAN, Credentials

log = logging.getLogger("strato.bulk")

_REQUEST = struct.Struct("<16sQQ")        # oid, offset, length
_ANSWER = struct.Struct("<BQ")            # ok, length that follows
_TOKEN_MAX = 1024
_PIECE = 8 * 1024 * 1024                 # one send call at most (SSL record batches)
_BOUNCE = 1024 * 1024                    # a puller's bytes between recv and pwrite
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
# the holder maps the file it sends with page tables filled in one call (its pages exist)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _contexts(creds: Credentials) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts: mutual TLS against the cluster CA only."""
    with tempfile.TemporaryDirectory(prefix="strato-bulk-") as d:
        cert, key = os.path.join(d, "node.crt"), os.path.join(d, "node.key")
        write_secret(cert, creds.cert)
        write_secret(key, creds.key)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(cert, key)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=creds.ca_cert.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = True   # certificates name SAN "strato-node", see tls.py
    return server, client


def _no_delay(sock: socket.socket) -> None:
    """Every write goes out at once. With Nagle's algorithm the end of an answer waited
    for the puller's delayed ACK of its start: a 1 MB pull took about 10 ms on loopback,
    and a stream of them (tasks with 1 MB arguments on another node) ran at half speed."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class BulkServer:
    """Serves this node's store files to other nodes of the cluster."""

    def __init__(self, creds: Credentials, token: str, paths: Callable):
        self._server_ctx, self.client_ctx = _contexts(creds)
        self._token = token.encode()
        self._paths = paths           # () -> the store's directories (memory, spill)
        self._sock: socket.socket | None = None
        self.port = 0
        self._closed = False

    def start(self, host: str) -> int:
        sock = socket.create_server((host, 0), backlog=64)
        self._sock = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="strato-bulk-accept",
                         daemon=True).start()
        return self.port

    def stop(self) -> None:
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="strato-bulk",
                             daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            _no_delay(raw)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            with self._server_ctx.wrap_socket(raw, server_side=True) as conn:
                (n,) = struct.unpack("<I", recv_exactly(conn, 4))
                if n > _TOKEN_MAX or not hmac.compare_digest(recv_exactly(conn, n),
                                                             self._token):
                    return   # wrong token: nothing parsed, nothing answered
                # a kept connection may idle between pulls; one idle this long (its
                # node gone without a word) is closed: the puller reconnects if it wants
                conn.settimeout(IDLE_TIMEOUT)
                while True:
                    try:
                        head = recv_exactly(conn, _REQUEST.size)
                    except ConnectionError:
                        return
                    oid, offset, length = _REQUEST.unpack(head)
                    self._answer(conn, oid, offset, length)
        except (OSError, ssl.SSLError, ValueError, struct.error):
            return   # a peer that is not of this cluster, or gone: drop it
        finally:
            try:
                raw.close()
            except OSError:
                pass

    def _open(self, oid: bytes, offset: int, length: int):
        """Map just the asked range of the object's file: (mapping or b"", where the
        range starts in it, its length); None if this node's store lacks the object."""
        name = oid.hex()
        for directory in self._paths():
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(fd).st_size
                start = min(offset, size)
                end = min(size, offset + length)
                base = start - start % mmap.ALLOCATIONGRANULARITY
                if end <= start:
                    return b"", 0, 0
                mm = mmap.mmap(fd, end - base, offset=base, prot=mmap.PROT_READ,
                               flags=mmap.MAP_SHARED | _POPULATE)
                return mm, start - base, end - start
            finally:
                os.close(fd)
        return None

    def _answer(self, conn, oid: bytes, offset: int, length: int) -> None:
        found = self._open(oid, offset, length)
        if found is None:
            conn.sendall(_ANSWER.pack(0, 0))
            return
        mm, at, n = found
        try:
            conn.sendall(_ANSWER.pack(1, n))
            with memoryview(mm) as view:
                for pos in range(at, at + n, _PIECE):
                    conn.sendall(view[pos:min(at + n, pos + _PIECE)])
        finally:
            if isinstance(mm, mmap.mmap):
                mm.close()


class BulkClient:
    """Pulls objects from other nodes' bulk servers (blocking: run in a thread).

    Connections are kept open per node and reused, so a stream of small objects pays
    for one TLS handshake, not one each."""

    def __init__(self, client_ctx: ssl.SSLContext, token: str, timeout: float):
        self._ctx = client_ctx
        self._token = token.encode()
        self._timeout = timeout
        self._lock = threading.Lock()
        self._open: dict[bytes, set] = {}   # node -> its connections (closed if it dies)
        self._idle: dict[bytes, list] = {}  # node -> connections free for a request
        self._dead = BoundedSet(maxlen=10_000)   # nodes declared dead: never dialled again
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        """This thread's bounce buffer (pulls run in a few pool threads)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(_BOUNCE))
        return buf

    def cancel_node(self, node: bytes) -> None:
        """The node died: break every transfer from it now (never wait on a dead peer)."""
        with self._lock:
            self._dead.add(node)
            conns = list(self._open.pop(node, ()))
            self._idle.pop(node, None)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _connect(self, node: bytes, host: str, port: int, reuse: bool = True):
        if node in self._dead:
            raise ConnectionError(f"node {node.hex()[:8]} is dead")
        with self._lock:
            idle = self._idle.get(node)
            if idle and reuse:
                return idle.pop(), True
        raw = socket.create_connection((host, port), timeout=self._timeout)
        _no_delay(raw)
        try:
            conn = self._ctx.wrap_socket(raw, server_hostname=SAN)
            conn.sendall(struct.pack("<I", len(self._token)) + self._token)
        except BaseException:
            raw.close()
            raise
        with self._lock:
            self._open.setdefault(node, set()).add(conn)
        return conn, False

    def _done(self, node: bytes, conn, reusable: bool) -> None:
        with self._lock:
            conns = self._open.get(node)
            if reusable and conns is not None and conn in conns:
                self._idle.setdefault(node, []).append(conn)
                return
            if conns is not None:
                conns.discard(conn)
        conn.close()

    def fetch_into(self, node: bytes, host: str, port: int, oid: bytes, fd: int,
                   size: int, offset: int = 0, length: int | None = None) -> None:
        """Copy the object's bytes ``[offset, offset + length)`` (default: all ``size``)
        into ``fd`` (a file of ``size`` bytes) at the same place; raises
        ``ConnectionError`` when the holder lacks it, dies, or stalls past the timeout."""
        length = size - offset if length is None else length
        try:
            self._fetch(node, host, port, oid, fd, size, offset, length, reuse=True)
        except _StaleConnection:
            # a kept connection the holder had closed (it restarted, or timed it out)
            self._fetch(node, host, port, oid, fd, size, offset, length, reuse=False)

    def _fetch(self, node: bytes, host: str, port: int, oid: bytes, fd: int, size: int,
               offset: int, length: int, reuse: bool) -> None:
        try:
            conn, reused = self._connect(node, host, port, reuse)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from exc
        reusable = False
        answered = False
        try:
            conn.sendall(_REQUEST.pack(oid, offset, length))
            ok, sent = _ANSWER.unpack(recv_exactly(conn, _ANSWER.size))
            answered = True
            if not ok:
                reusable = True
                raise ConnectionError(f"object {oid.hex()} is not in that node's store")
            if sent != length:
                raise ConnectionError(f"object {oid.hex()}: {sent} bytes there at "
                                      f"{offset}, {length} expected")
            if length:
                # through a bounce buffer: os.pwrite fills the new file's pages without
                # a page fault each (nor zeroing them first), and maps nothing
                buf = self._buffer()
                got = 0
                while got < length:
                    want = min(length - got, len(buf))
                    fill = 0
                    while fill < want:
                        k = conn.recv_into(buf[fill:want], want - fill)
                        if not k:
                            raise ConnectionError("the holder closed the transfer")
                        fill += k
                    done = 0
                    while done < fill:
                        done += os.pwrite(fd, buf[done:fill], offset + got + done)
                    got += fill
            reusable = True
        except (OSError, ssl.SSLError) as exc:
            if reused and not answered:
                raise _StaleConnection() from exc
            if isinstance(exc, ConnectionError):
                raise
            raise ConnectionError(str(exc) or type(exc).__name__) from exc
        finally:
            self._done(node, conn, reusable)


class _StaleConnection(Exception):
    pass
