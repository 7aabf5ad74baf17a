"""The launcher's one way into a node: run commands, copy files and open shells over SSH.

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
import posixpath
import re
import select
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import paramiko

from strato.exceptions import CommandError, LauncherError, SSHUnavailableError
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
TAIL_LINES = 50
KEEPALIVE_SECONDS = 15      # SSH-level keepalive: keeps unacknowledged data in flight ...
DEAD_PEER_SECONDS = 60      # ... so TCP_USER_TIMEOUT drops a vanished node's connection

LineCallback = Callable[[str], None]


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


class CommandTimeoutError(CommandError):
    """A remote command ran past its ``timeout`` (its channel was closed)."""

    def __init__(self, node: str, command: str, timeout: float, output_tail: str = ""):
        super().__init__(node, command, -1, output_tail)
        self.timeout = timeout

    def __str__(self) -> str:
        msg = f"command timed out after {self.timeout:g}s on {self.node}: {self.command}"
        if self.output_tail:
            msg += "\n--- last output ---\n" + self.output_tail
        return msg


class FileTransferError(LauncherError):
    """Copying files to or from a node over SFTP failed."""


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


def _endpoint(target: SSHTarget) -> tuple[str, int]:
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
    host, port = _endpoint(target)
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


def _connected(target: SSHTarget, timeout: float) -> paramiko.SSHClient:
    """Like :func:`_client`, but a failure is one :class:`SSHUnavailableError` naming the node."""
    try:
        return _client(target, timeout)
    except AddressNotMappedError:
        raise
    except (OSError, EOFError, paramiko.SSHException) as e:
        host, port = _endpoint(target)
        raise SSHUnavailableError(
            f"node {target.label}: cannot connect over SSH to {_describe(target, host, port)}: "
            f"{type(e).__name__}: {e}") from e


def disconnect(target: SSHTarget) -> None:
    """Close and forget the cached connection to ``target`` (e.g. after the node restarted)."""
    with contextlib.suppress(AddressNotMappedError):
        host, port = _endpoint(target)
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
    host, port = _endpoint(target)  # strict-map refusal is raised here, before any connect
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


# ---------------------------------------------------------------- commands
_console = None


def print_line(name: str, line: str) -> None:
    """Default output sink: ``[name] line`` on the terminal via rich (no markup parsing)."""
    global _console
    from rich.console import Console
    from rich.text import Text

    if _console is None:
        _console = Console(highlight=False, soft_wrap=True)
    _console.print(Text.assemble((f"[{name}] ", "cyan"), line))


def silent(line: str) -> None:
    """An output sink that drops lines (pass as ``stream_to`` for quiet commands)."""


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _upload_env(client: paramiko.SSHClient, env: Mapping[str, str], label: str) -> str:
    """Write ``export`` lines to a fresh 0600 file on the node; returns its path.

    Values (the cluster token among them) thus never appear on a command line (``ps``)
    nor in any log; the wrapper sources and deletes the file before the command runs.
    """
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"env: {name!r} is not a valid environment variable name")
    body = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())
    path = f"/tmp/.strato-env-{uuid.uuid4().hex}"
    try:
        with client.open_sftp() as sftp, sftp.open(path, "wx") as f:
            f.chmod(0o600)
            f.write(body.encode())
    except (OSError, EOFError, paramiko.SSHException) as e:  # EOFError: a vanished host
        raise FileTransferError(f"node {label}: could not send the command environment: {e}") from e
    return path


def _remote_command(command: str, env_file: str | None) -> str:
    """``bash -c`` around the command, first loading (and deleting) the env file."""
    script = command
    if env_file:
        f = shlex.quote(env_file)
        script = (f". {f} && rm -f {f} || {{ rm -f {f}; "
                  f"echo 'strato: could not load the command environment' >&2; exit 97; }}\n"
                  + command)
    return "bash -c " + shlex.quote(script)


class _LineSplitter:
    """Turns output chunks into lines for the callback, keeping a tail for errors."""

    def __init__(self, sink: LineCallback):
        self.sink = sink
        self.buffer = b""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > 65536:  # no newline in sight: flush anyway
            lines.append(self.buffer)
            self.buffer = b""
        for raw in lines:
            self._emit(raw)

    def close(self) -> None:
        if self.buffer:
            self._emit(self.buffer)
            self.buffer = b""

    def _emit(self, raw: bytes) -> None:
        # "\r" redraws a progress bar: show what the terminal would end up showing.
        line = raw.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1]
        self.tail.append(line)
        try:
            self.sink(line)
        except Exception:  # a broken sink must not lose the command's exit code
            log.exception("output callback failed")


def run(target: SSHTarget, command: str, *, env: Mapping[str, str] | None = None,
        stream_to: LineCallback | None = None, log_file: str | os.PathLike | None = None,
        timeout: float | None = None, check: bool = True, pty: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> tuple[int, str]:
    """Run ``command`` with bash on the node, streaming its output line by line.

    Lines go to ``stream_to`` (default: printed as ``[name] line``; pass :func:`silent`
    to drop them) and, in full, to ``log_file`` (appended). stdin is empty. ``env`` is
    exported for the command without ever being shown or logged. Returns
    ``(exit_code, output_tail)``, exit code -1 for death by a signal; raises :class:`CommandError` on a non-zero exit when
    ``check``, :class:`CommandTimeoutError` past ``timeout`` (without a pty the remote
    process may outlive its closed channel), :class:`SSHUnavailableError` if the node
    cannot be reached.
    """
    label = target.label
    sink = stream_to or (lambda line: print_line(label, line))
    client = _connected(target, connect_timeout)
    env_file = _upload_env(client, env, label) if env else None
    log.debug("[%s] $ %s", label, command)

    splitter = _LineSplitter(sink)
    log_fh: IO[bytes] | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        log_fh = open(log_file, "ab")  # noqa: SIM115 - closed in finally
        log_fh.write(f"$ {command}\n".encode())
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        try:
            transport = client.get_transport()
            assert transport is not None
            chan = transport.open_session(timeout=connect_timeout)
        except (OSError, EOFError, paramiko.SSHException, AssertionError) as e:
            disconnect(target)
            raise SSHUnavailableError(f"node {label}: SSH session could not be opened: {e}") from e
        with chan:
            if pty:
                chan.get_pty(term=os.environ.get("TERM", "xterm"), width=200)
            else:
                chan.set_combine_stderr(True)
            chan.exec_command(_remote_command(command, env_file))
            chan.shutdown_write()
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    splitter.close()
                    raise CommandTimeoutError(label, command, timeout or 0.0,
                                              "\n".join(splitter.tail))
                chan.settimeout(wait)
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if log_fh:
                    log_fh.write(data)
                    log_fh.flush()
                splitter.feed(data)
            splitter.close()
            wait = 30.0 if deadline is None else max(0.1, deadline - time.monotonic())
            exit_code = chan.recv_exit_status() if chan.status_event.wait(wait) else -1
    finally:
        if log_fh:
            log_fh.close()
    tail = "\n".join(splitter.tail)
    if exit_code == -1 and not transport.is_active():  # the node vanished under the command
        disconnect(target)
        raise CommandError(label, command, -1, (tail + "\n" if tail else "")
                           + "(connection lost before the command reported an exit status)")
    if check and exit_code != 0:
        if exit_code == -1:  # sshd reports death by a signal without an exit status
            tail = (tail + "\n" if tail else "") + "(the command was killed by a signal)"
        raise CommandError(label, command, exit_code, tail)
    return exit_code, tail


# ---------------------------------------------------------------- files
def _remote_abspath(sftp: paramiko.SFTPClient, path: str) -> str:
    """Expand a leading ``~`` to the login's home, as a shell would."""
    if path == "~" or path.startswith("~/"):
        home = sftp.normalize(".")
        return posixpath.join(home, path[2:]) if path != "~" else home
    return path


def _remote_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    if path in ("", "/", "."):
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode):
            return
        raise NotADirectoryError(f"{path} exists and is not a directory")
    except FileNotFoundError:
        pass
    _remote_makedirs(sftp, posixpath.dirname(path.rstrip("/")))
    try:
        sftp.mkdir(path)
    except OSError:  # created meanwhile by a concurrent copy?
        if not stat.S_ISDIR(sftp.stat(path).st_mode):
            raise


def _remote_remove(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(OSError):
        sftp.remove(path)


def _put_one(sftp: paramiko.SFTPClient, local: Path, remote: str) -> None:
    if local.is_symlink():
        _remote_remove(sftp, remote)
        sftp.symlink(os.readlink(local), remote)
        return
    sftp.put(str(local), remote)
    sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))


def put(target: SSHTarget, local_path: str | os.PathLike, remote_path: str) -> None:
    """Copy a local file or directory to ``remote_path`` on the node (like ``cp -rT``).

    Parent directories are created; a directory's contents are merged into
    ``remote_path`` (existing files overwritten, extra ones kept); modes and symlinks are
    preserved; a leading ``~`` means the login's home.
    """
    local = Path(local_path).expanduser()
    if not local.exists() and not local.is_symlink():
        raise FileNotFoundError(f"put to {target.label}: no such local path {local}")
    client = _connected(target, DEFAULT_CONNECT_TIMEOUT)
    try:
        with client.open_sftp() as sftp:
            remote = _remote_abspath(sftp, remote_path).rstrip("/") or "/"
            if not local.is_dir() or local.is_symlink():
                _remote_makedirs(sftp, posixpath.dirname(remote))
                _put_one(sftp, local, remote)
                return
            _remote_makedirs(sftp, remote)
            for root, dirs, files in os.walk(local):
                rel = Path(root).relative_to(local).as_posix()
                rdir = remote if rel == "." else posixpath.join(remote, rel)
                for d in list(dirs):
                    src, dst = Path(root, d), posixpath.join(rdir, d)
                    if src.is_symlink():  # not descended by os.walk: copy the link itself
                        _put_one(sftp, src, dst)
                    else:
                        _remote_makedirs(sftp, dst)
                        sftp.chmod(dst, stat.S_IMODE(src.stat().st_mode))
                for name in files:
                    _put_one(sftp, Path(root, name), posixpath.join(rdir, name))
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(
            f"node {target.label}: put {local} -> {remote_path} failed: {e}") from e


def _get_tree(sftp: paramiko.SFTPClient, remote: str, local: Path) -> None:
    attrs = sftp.lstat(remote)
    mode = attrs.st_mode or 0
    if stat.S_ISLNK(mode):
        if local.is_symlink() or local.is_file():
            local.unlink()
        os.symlink(sftp.readlink(remote), local)
    elif stat.S_ISDIR(mode):
        local.mkdir(parents=True, exist_ok=True)
        for entry in sftp.listdir_attr(remote):
            _get_tree(sftp, posixpath.join(remote, entry.filename), local / entry.filename)
        os.chmod(local, stat.S_IMODE(mode))
    else:
        sftp.get(remote, str(local))
        os.chmod(local, stat.S_IMODE(mode))


def get(target: SSHTarget, remote_path: str, local_path: str | os.PathLike) -> None:
    """Copy a file or directory from the node to ``local_path`` (like ``cp -rT``).

    Same rules as :func:`put`, in the other direction.
    """
    local = Path(local_path).expanduser()
    client = _connected(target, DEFAULT_CONNECT_TIMEOUT)
    try:
        with client.open_sftp() as sftp:
            remote = _remote_abspath(sftp, remote_path).rstrip("/") or "/"
            local.parent.mkdir(parents=True, exist_ok=True)
            _get_tree(sftp, remote, local)
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(
            f"node {target.label}: get {remote_path} -> {local} failed: {e}") from e


# ---------------------------------------------------------------- interactive
def ssh_command_line(target: SSHTarget, command: str | None = None, *,
                     tty: bool = True) -> list[str]:
    """argv for the system ``ssh`` binary reaching ``target`` (address map applied)."""
    host, port = _endpoint(target)
    argv = [shutil.which("ssh") or "ssh", "-t" if tty else "-T", "-p", str(port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]
    if target.key_path:
        argv += ["-i", os.path.expanduser(target.key_path), "-o", "IdentitiesOnly=yes"]
    argv.append(f"{target.user}@{host}")
    if command:
        argv.append(command)
    return argv


def interactive_shell(target: SSHTarget, command: str | None = None) -> int:
    """Give the local terminal to a shell (or ``command``) on the node; returns its exit code.

    Uses the system ``ssh`` when installed (best terminal handling), else a paramiko pty.
    """
    tty = sys.stdin.isatty()
    if shutil.which("ssh"):
        return subprocess.call(ssh_command_line(target, command, tty=tty))
    client = _connected(target, DEFAULT_CONNECT_TIMEOUT)
    size = shutil.get_terminal_size()
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session()
    chan.get_pty(term=os.environ.get("TERM", "xterm"), width=size.columns, height=size.lines)
    if command:
        chan.exec_command(command)
    else:
        chan.invoke_shell()
    return _pump_terminal(chan, tty)


def _pump_terminal(chan: paramiko.Channel, tty: bool) -> int:
    """Shuttle bytes between the local terminal (raw mode) and a pty channel."""
    import termios
    import tty as ttymod

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if tty else None
    try:
        if tty:
            ttymod.setraw(fd)
        stdin_open = True
        while True:
            readers = [chan, fd] if stdin_open else [chan]
            ready, _, _ = select.select(readers, [], [], 1.0)
            if chan in ready:
                data = chan.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 4096)
                if data:
                    chan.sendall(data)
                else:
                    stdin_open = False
                    chan.shutdown_write()
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return chan.recv_exit_status()
