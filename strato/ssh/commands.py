"""Running a command on a node over SSH, its output streamed line by line."""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import paramiko

from strato.exceptions import CommandError, SSHUnavailableError
from strato.ssh.connect import DEFAULT_CONNECT_TIMEOUT, SSHTarget, connected, disconnect
from strato.ssh.files import FileTransferError

log = logging.getLogger(__name__)

TAIL_LINES = 50

LineCallback = Callable[[str], None]


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
    client = connected(target, connect_timeout)
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

