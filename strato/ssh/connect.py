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
import base64
import binascii
import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from strato.exceptions import HostKeyMismatchError, LauncherError, SSHUnavailableError
from strato.localfiles import atomic_write, file_lock, strato_home

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
    #: the file this node's host key is pinned in (one per cluster, see
    #: :func:`pinned_hosts_path`); None: ``$STRATO_HOME/known_hosts``
    known_hosts: str | None = None
    #: an OpenSSH known_hosts of the user's (e.g. ``~/.ssh/known_hosts``) that, when it
    #: lists the node's address, is the authority for its key
    user_known_hosts: str | None = None

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
# Every node's host key is pinned on first contact and verified on every later one. Pins
# live in an OpenSSH known_hosts file per cluster (so the ``ssh`` binary of ``attach``
# checks them too): the address really dialed, the key, and a ``strato-node=<id>`` comment.
# A cloud gives addresses to new machines, so a pin belongs to a node id (instance id):
# a new node at an old address is pinned afresh (the old line goes), a changed key for the
# same node is a HostKeyMismatchError. Nodes without an id are pinned by address.
_NODE_COMMENT = "strato-node="


def known_hosts_path() -> Path:
    """Where keys of targets without a cluster pin file are pinned."""
    return strato_home() / "known_hosts"


def pinned_hosts_path(cluster: str) -> Path:
    """The pin file of one cluster's nodes (``down`` removes it)."""
    return strato_home() / "hostkeys" / f"{cluster}.known_hosts"


def known_host_name(host: str, port: int) -> str:
    """How known_hosts (and paramiko) name an address: ``h`` or ``[h]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


@dataclass
class _Pin:
    hosts: str      # known_hosts host field: the dialed address
    key_type: str
    key_b64: str
    node: str       # node id (or the address, for targets without one)

    def line(self) -> str:
        return f"{self.hosts} {self.key_type} {self.key_b64} {_NODE_COMMENT}{self.node}\n"

    def key(self) -> paramiko.PKey:
        return paramiko.PKey.from_type_string(self.key_type, base64.b64decode(self.key_b64))


def _read_pins(path: Path) -> list[_Pin]:
    pins = []
    with contextlib.suppress(FileNotFoundError):
        for raw in path.read_text().splitlines():
            fields = raw.split()
            if len(fields) < 3 or raw.lstrip().startswith("#"):
                continue
            node = next((f[len(_NODE_COMMENT):] for f in fields[3:]
                         if f.startswith(_NODE_COMMENT)), fields[0])
            pins.append(_Pin(fields[0], fields[1], fields[2], node))
    return pins


def host_key_file(target: SSHTarget) -> Path:
    """The file ``target``'s host key is pinned in."""
    return Path(target.known_hosts).expanduser() if target.known_hosts else known_hosts_path()


def _pin_id(target: SSHTarget, host: str, port: int) -> str:
    return target.node_id or known_host_name(host, port)


def _user_keys(target: SSHTarget, host: str, port: int) -> dict[str, paramiko.PKey]:
    """The user's known_hosts keys for the node (dialed address, then configured one)."""
    if not target.user_known_hosts:
        return {}
    path = Path(target.user_known_hosts).expanduser()
    if not path.is_file():
        return {}
    keys = paramiko.HostKeys()
    try:
        keys.load(str(path))
    except (OSError, paramiko.SSHException, ValueError) as e:
        log.warning("cannot read known_hosts %s: %s", path, e)
        return {}
    for name in dict.fromkeys([known_host_name(host, port),
                               known_host_name(target.host, target.port)]):
        found = keys.lookup(name)
        if found:
            return dict(found)
    return {}


def _expected_keys(target: SSHTarget, host: str, port: int) -> tuple[dict[str, paramiko.PKey], str]:
    """The keys the node must present and the file that says so (empty: first contact)."""
    user = _user_keys(target, host, port)
    if user:
        return user, str(Path(str(target.user_known_hosts)).expanduser())
    path = host_key_file(target)
    node = _pin_id(target, host, port)
    keys: dict[str, paramiko.PKey] = {}
    for pin in _read_pins(path):
        if pin.node == node:
            with contextlib.suppress(ValueError, paramiko.SSHException, binascii.Error):
                keys[pin.key_type] = pin.key()
    return keys, str(path)


def pin_host_key(target: SSHTarget, host: str, port: int, key: paramiko.PKey) -> None:
    """Record ``key`` as the node's (first contact, or a new address of the same node);
    a line of another node at the same address (a machine that is gone) is dropped."""
    path = host_key_file(target)
    node = _pin_id(target, host, port)
    name = known_host_name(host, port)
    new = _Pin(name, key.get_name(), key.get_base64(), node)
    with file_lock(f"{path}.lock"):
        pins = _read_pins(path)
        if new in pins:
            return
        kept = [p for p in pins if p.node != node and p.hosts != name]
        kept.append(new)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, "".join(p.line() for p in kept).encode(), mode=0o600, fsync=False)


def forget_host_keys(path: str | os.PathLike[str]) -> None:
    """Remove a pin file (``down``: the cluster's nodes are gone)."""
    for p in (Path(path), Path(f"{path}.lock")):
        p.unlink(missing_ok=True)


def _mismatch(target: SSHTarget, host: str, port: int, got: paramiko.PKey,
              expected: dict[str, paramiko.PKey], source: str) -> HostKeyMismatchError:
    name = known_host_name(host, port)
    want = expected.get(got.get_name()) or next(iter(expected.values()))
    node = target.node_id or target.host
    pinned = source == str(host_key_file(target))
    where = "pinned on first contact in" if pinned else "listed in your"
    fix = (f"ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(source)}"
           + (" (or `strato down` the cluster, which forgets its pinned keys)" if pinned
              else ""))
    return HostKeyMismatchError(
        f"node {target.label} (id {node}) at {_describe(target, host, port)}: its SSH host "
        f"key has CHANGED: expected {fingerprint(want)} ({where} {source}), got "
        f"{fingerprint(got)}. Nothing was sent to it. Someone may be intercepting the "
        f"connection, or the machine was reinstalled; if you know it was, accept the new "
        f"key by removing the old one: {fix}",
        node=node, address=name, expected=fingerprint(want), got=fingerprint(got),
        source=source)


class _FirstContact(paramiko.MissingHostKeyPolicy):
    """Called only when nothing is known of the node's keys: accept (``_open_client`` pins
    the key once the connection is up). Known keys of another type: a mismatch."""

    def __init__(self, target: SSHTarget, host: str, port: int,
                 expected: dict[str, paramiko.PKey], source: str):
        self.args = (target, host, port)
        self.expected, self.source = expected, source

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if self.expected:
            raise _mismatch(*self.args, key, self.expected, self.source)


# ---------------------------------------------------------------- connections
_PoolKey = tuple[str, int, str, "str | None", "str | None", "str | None"]
_clients: dict[_PoolKey, paramiko.SSHClient] = {}
_key_locks: dict[_PoolKey, threading.Lock] = {}
_clients_lock = threading.Lock()


def _pool_key(target: SSHTarget, host: str, port: int) -> _PoolKey:
    """One pooled connection per machine (node id) and login, verified against one pin file."""
    return (host, port, target.user, target.key_path, target.node_id,
            str(host_key_file(target)))


def _open_client(host: str, port: int, target: SSHTarget, timeout: float) -> paramiko.SSHClient:
    key = os.path.expanduser(target.key_path) if target.key_path else None
    expected, source = _expected_keys(target, host, port)
    client = paramiko.SSHClient()
    for key_type, known in expected.items():  # paramiko prefers, then verifies, these
        client.get_host_keys().add(known_host_name(host, port), key_type, known)
    client.set_missing_host_key_policy(_FirstContact(target, host, port, expected, source))
    try:
        client.connect(host, port=port, username=target.user, key_filename=key,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=key is None, look_for_keys=key is None)
    except paramiko.BadHostKeyException as e:
        client.close()
        raise _mismatch(target, host, port, e.key, expected, source) from e
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    assert transport is not None
    try:
        pin_host_key(target, host, port, transport.get_remote_server_key())
    except OSError as e:  # an unpinned key is re-checked as a first contact next time
        log.warning("could not pin the host key of %s in %s: %s", target.label,
                    host_key_file(target), e)
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
    key = _pool_key(target, host, port)
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
            client = _clients.pop(_pool_key(target, host, port), None)
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

