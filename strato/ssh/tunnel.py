"""A TCP connection to an address on the node's side, carried by the pooled SSH
connection (a ``direct-tcpip`` channel): how a laptop reaches a port the head binds on
127.0.0.1 only, with nothing but SSH open.

The channel is bridged to one end of a local socketpair, so code that needs a real
socket (blocking ``recv_into``/``sendmsg``) gets one; two pump threads copy between them,
and either side closing (or the SSH connection dying) closes both.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import paramiko

from strato.exceptions import SSHUnavailableError
from strato.ssh.connect import DEFAULT_CONNECT_TIMEOUT, SSHTarget, connected

WINDOW = 16 * 1024 * 1024    # SSH flow-control window of the channel
PUMP_CHUNK = 1 << 20


def open_tunnel(target: SSHTarget, host: str, port: int, *,
                timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
    """A connected socket whose bytes reach ``host:port`` as seen from ``target``."""
    client = connected(target, timeout)
    transport = client.get_transport()
    try:
        if transport is None:
            raise paramiko.SSHException("the SSH connection is closed")
        chan = transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                      timeout=timeout, window_size=WINDOW)
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise SSHUnavailableError(f"node {target.label}: cannot open a tunnel to {host}:{port} "
                                  f"over SSH: {type(e).__name__}: {e}") from e
    ours, theirs = socket.socketpair()
    threading.Thread(target=_to_channel, args=(theirs, chan), name="strato-tunnel-out",
                     daemon=True).start()
    threading.Thread(target=_from_channel, args=(chan, theirs), name="strato-tunnel-in",
                     daemon=True).start()
    return ours


def _to_channel(sock: socket.socket, chan: paramiko.Channel) -> None:
    try:
        while True:
            data = sock.recv(PUMP_CHUNK)
            if not data:
                break
            chan.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            chan.shutdown_write()


def _from_channel(chan: paramiko.Channel, sock: socket.socket) -> None:
    try:
        while True:
            data = chan.recv(PUMP_CHUNK)
            if not data:
                break
            sock.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        chan.close()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
