"""Reaching a node over SSH: where to connect (the address map), pinned host keys, and
the process-wide connection pool.

Everything goes through paramiko, one cached connection per (address, user, key) in a
process, so bootstrapping a node costs one handshake however many commands it runs.

Tests never contact the addresses a cloud fake reports: every connection first passes
through :func:`resolve_address`, which maps a cloud address or instance id to a test host
using the JSON file named by ``STRATO_SSH_ADDRESS_MAP`` (``{"54.1.2.3": "10.200.0.3:22"}``).
With ``STRATO_SSH_ADDRESS_MAP_STRICT=1`` an unmapped address raises
:class:`AddressNotMappedError` before any socket is opened.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from strato.exceptions import LauncherError, SSHUnavailableError
from strato.localfiles import file_lock, strato_home

log = logging.getLogger(__name__)
# paramiko logs every refused connect at ERROR with a traceback; wait_for_ssh expects
# those while a node boots. Give it a handler so Python's last-resort stderr printer stays
# quiet; applications that configure logging still see the records.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

ADDRESS_MAP_ENV = "STRATO_SSH_ADDRESS_MAP"
ADDRESS_MAP_STRICT_ENV = "STRATO_SSH_ADDRESS_MAP_STRICT"
DEFAULT_CONNECT_TIMEOUT = 20.0
# A machine whose sshd keeps refusing our key will not start accepting it: give up after
# this long (a cloud guest agent installs metadata keys within seconds of boot).
KEY_REFUSED_TIMEOUT = 60.0
KEY_REFUSED_TIMEOUT_ENV = "STRATO_SSH_KEY_REFUSED_TIMEOUT"
KEEPALIVE_SECONDS = 15      # SSH-level keepalive: keeps unacknowledged data in flight ...
DEAD_PEER_SECONDS = 60      # ... so TCP_USER_TIMEOUT drops a vanished node's connection


# ---------------------------------------------------------------- errors
class AddressNotMappedError(LauncherError):
    """Strict address mapping is on and an address has no entry: nothing was contacted."""

    def __init__(self, address: str, node_id: str | None, map_path: str | None):
        self.address = address
        self.node_id = node_id
        self.map_path = map_path
        who = f"node {node_id} at {address!r}" if node_id and node_id != address else repr(address)
        super().__init__(
            f"refusing to contact SSH address {who}: no entry in the address map "
            f"{map_path or '(none set: ' + ADDRESS_MAP_ENV + ' is empty)'} and "
            f"{ADDRESS_MAP_STRICT_ENV}=1 forbids falling back to the real address")


# ---------------------------------------------------------------- targets and addresses
@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to connect; ``name`` prefixes every streamed output line.

    ``host`` may be a cloud-reported address; the address map (tests) rewrites it at
    connect time, looking up ``node_id`` first, then ``host``.
    """

    host: str
    port: int = 22
    user: str = field(default_factory=getpass.getuser)
    key_path: str | None = None
    name: str = ""
    node_id: str | None = None

    @property
    def label(self) -> str:
        """What error messages and log prefixes call this node."""
        return self.name or self.node_id or self.host


_override_map: dict[str, str] | None = None
_override_strict = False


def set_address_map(mapping: Mapping[str, str] | None, *, strict: bool = False) -> None:
    """Map addresses in-process (instead of the env var); ``None`` goes back to the env var."""
    global _override_map, _override_strict
    _override_map = dict(mapping) if mapping is not None else None
    _override_strict = strict


def _address_map() -> tuple[dict[str, str], bool, str | None]:
    """The current map, whether it is strict, and where it came from (read on every call,
    so a test can add entries while the launcher runs in another process)."""
    if _override_map is not None:
        return _override_map, _override_strict, "set_address_map()"
    strict = os.environ.get(ADDRESS_MAP_STRICT_ENV, "").strip().lower() in ("1", "true", "yes")
    path = os.environ.get(ADDRESS_MAP_ENV, "").strip()
    if not path:
        return {}, strict, None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LauncherError(f"cannot read SSH address map {ADDRESS_MAP_ENV}={path}: {e}") from e
    if not isinstance(data, dict):
        raise LauncherError(f"SSH address map {path} must be a JSON object of address -> host:port")
    return {str(k): str(v) for k, v in data.items()}, strict, path


def _split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """'h', 'h:22', '[::1]:22' -> (host, port)."""
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:]+)(?::(?P<p>\d+))?", value)
    if not m:  # a bare IPv6 address
        return value, default_port
    host = m.group("h6") or m.group("h")
    port = m.group("p6") or m.group("p")
    return host, int(port) if port else default_port


def resolve_address(addr: str, node_id: str | None = None, *, port: int = 22) -> tuple[str, int]:
    """The (host, port) to really connect to for a node's reported address.

    Looks up ``node_id`` then ``addr`` in the address map; unmapped addresses pass through
    unchanged unless strict mode is on, in which case :class:`AddressNotMappedError` is
    raised (no connection is ever attempted to an unmapped address).
    """
    mapping, strict, source = _address_map()
    for key in (node_id, addr):
        if key and key in mapping:
            return _split_host_port(mapping[key], port)
    if strict:
        raise AddressNotMappedError(addr, node_id, source)
    return addr, port


def endpoint(target: SSHTarget) -> tuple[str, int]:
    """The (host, port) really connected to for ``target`` (address map applied)."""
    return resolve_address(target.host, target.node_id, port=target.port)


def _describe(target: SSHTarget, host: str, port: int) -> str:
    where = f"{target.user}@{host}:{port}"
    if host != target.host:
        where += f" (mapped from {target.host})"
    return where


# ---------------------------------------------------------------- host keys
def known_hosts_path() -> Path:
    return strato_home() / "known_hosts"


class _RecordHostKey(paramiko.MissingHostKeyPolicy):
    """Accept every host key and record it (replacing an old one for the same address).

    Cloud and on-prem addresses are reused by new machines, so a changed key is normal
    here; the client never loads known_hosts for checking, so nothing is ever rejected.
    """

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        path = known_hosts_path()
        try:
            with file_lock(f"{path}.lock"):
                keys = paramiko.HostKeys()
                if path.exists():
                    keys.load(str(path))
                keys.add(hostname, key.get_name(), key)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                keys.save(str(tmp))
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
        except (OSError, paramiko.SSHException) as e:
            log.debug("could not record host key of %s in %s: %s", hostname, path, e)


# ---------------------------------------------------------------- connections
_clients: dict[tuple[str, int, str, str | None], paramiko.SSHClient] = {}
_key_locks: dict[tuple[str, int, str, str | None], threading.Lock] = {}
_clients_lock = threading.Lock()


def _open_client(host: str, port: int, target: SSHTarget, timeout: float) -> paramiko.SSHClient:
    key = os.path.expanduser(target.key_path) if target.key_path else None
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_RecordHostKey())
    try:
        client.connect(host, port=port, username=target.user, key_filename=key,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=key is None, look_for_keys=key is None)
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(KEEPALIVE_SECONDS)
    _detect_dead_peer(transport.sock)
    return client


def _detect_dead_peer(sock: object) -> None:
    """Make a connection to a node that vanished (preempted, partitioned) fail within
    ``DEAD_PEER_SECONDS`` instead of TCP's ~15 minutes, so ``run`` raises rather than hangs."""
    if not isinstance(sock, socket.socket):
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_SECONDS), ("TCP_KEEPINTVL", KEEPALIVE_SECONDS),
                        ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", DEAD_PEER_SECONDS * 1000)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), int(value)))
    for level, opt, value in opts:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, value)


def _client(target: SSHTarget, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> paramiko.SSHClient:
    """The cached live client for ``target``, connecting once if needed (raises raw errors)."""
    host, port = endpoint(target)
    key = (host, port, target.user, target.key_path)
    with _clients_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        client = _clients.get(key)
        transport = client.get_transport() if client else None
        if client is not None and transport is not None and transport.is_active():
            return client
        if client is not None:
            client.close()
            _clients.pop(key, None)
        client = _open_client(host, port, target, timeout)
        _clients[key] = client
        return client


def connected(target: SSHTarget, timeout: float) -> paramiko.SSHClient:
    """The pooled live client for ``target`` (connecting once if needed); a failure is one
    :class:`SSHUnavailableError` naming the node."""
    try:
        return _client(target, timeout)
    except AddressNotMappedError:
        raise
    except (OSError, EOFError, paramiko.SSHException) as e:
        host, port = endpoint(target)
        raise SSHUnavailableError(
            f"node {target.label}: cannot connect over SSH to {_describe(target, host, port)}: "
            f"{type(e).__name__}: {e}") from e


def disconnect(target: SSHTarget) -> None:
    """Close and forget the cached connection to ``target`` (e.g. after the node restarted)."""
    with contextlib.suppress(AddressNotMappedError):
        host, port = endpoint(target)
        with _clients_lock:
            client = _clients.pop((host, port, target.user, target.key_path), None)
        if client is not None:
            client.close()


@atexit.register
def close_all() -> None:
    """Close every cached connection (also run at interpreter exit)."""
    for client in list(_clients.values()):
        client.close()
    _clients.clear()


def key_refused_timeout() -> float:
    """How long ``wait_for_ssh`` keeps trying while sshd refuses the key (env
    ``STRATO_SSH_KEY_REFUSED_TIMEOUT``, default ``KEY_REFUSED_TIMEOUT``)."""
    try:
        return float(os.environ.get(KEY_REFUSED_TIMEOUT_ENV, KEY_REFUSED_TIMEOUT))
    except ValueError:
        return KEY_REFUSED_TIMEOUT


def wait_for_ssh(target: SSHTarget, timeout: float = 300.0) -> None:
    """Block until ``target`` accepts an SSH login, retrying with exponential backoff.

    A booting machine refuses, resets or times out for a while; every such error is
    retried until ``timeout``, then :class:`SSHUnavailableError` names the node, the
    address and the last error. A key that sshd keeps refusing fails sooner, after
    ``key_refused_timeout()`` seconds, saying so. The successful connection is kept for later calls, and
    an already cached live connection counts as available (``disconnect`` first to probe
    afresh).
    """
    host, port = endpoint(target)  # strict-map refusal is raised here, before any connect
    deadline = time.monotonic() + timeout
    refused_limit = key_refused_timeout()
    refused_since: float | None = None
    delay, attempts = 0.25, 0
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        try:
            _client(target, timeout=min(DEFAULT_CONNECT_TIMEOUT, max(0.5, remaining)))
            return
        except paramiko.AuthenticationException as e:
            # sshd answers but refuses the key: normal for the seconds before a cloud's
            # guest agent installs it, a dead end after that (the machine lacks our key)
            last = e
            now = time.monotonic()
            refused_since = now if refused_since is None else refused_since
            if now - refused_since >= refused_limit:
                raise SSHUnavailableError(
                    f"node {target.label}: SSH at {_describe(target, host, port)} refuses the "
                    f"key {target.key_path or '(agent)'} for user {target.user} "
                    f"({now - refused_since:.0f}s, {attempts} attempts): the machine does not "
                    "have this public key (on GCE: in the instance's or the project's "
                    "ssh-keys metadata)") from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            last = e
            refused_since = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SSHUnavailableError(
                f"node {target.label}: SSH at {_describe(target, host, port)} not available "
                f"after {timeout:g}s ({attempts} attempts); last error: "
                f"{type(last).__name__}: {last}") from last
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 5.0)

