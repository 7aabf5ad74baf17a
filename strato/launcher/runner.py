"""Command runners: one interface to run commands on a node, over SSH or on this machine.

``SSHRunner`` (cloud and on-prem nodes, through :mod:`strato.ssh`) and
``LocalRunner`` (nodes of the ``local`` provider, which are processes here) both stream
output live, each line prefixed with the node's name, and append it to the node's log
file. Secrets (the cluster token) are replaced by ``***`` before a line is shown or saved.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import paramiko

from strato import ssh
from strato.exceptions import CommandError, SSHUnavailableError
from strato.ssh import CommandTimeoutError, SSHTarget
from strato.ssh.files import NO_FILTER, CopyFilter

__all__ = ["CommandRunner", "LocalRunner", "OutputSink", "SSHRunner", "abort_running",
           "print_plain", "shell_path"]

REDACTED = "***"
_print_lock = threading.Lock()


def shell_path(path: str) -> str:
    """Quote a path for the node's shell, keeping a leading ``~/`` expandable as $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def print_plain(name: str, line: str) -> None:
    """Print a node's output line as it is on stdout: no name prefix, no markup."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class OutputSink:
    """Where a node's output lines go: the terminal (prefixed, via rich) and its log file."""

    def __init__(self, name: str, log_file: Path | None, secrets: Iterable[str] = (),
                 echo: bool = True, console_print: Callable[[str, str], None] | None = None):
        self.name = name
        self.log_file = log_file
        self.secrets = [s for s in secrets if s]
        self.echo = echo
        self._print = console_print or ssh.print_line
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def write_log(self, text: str) -> None:
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8", errors="replace") as f:
                f.write(self.redact(text) + "\n")

    def line(self, line: str, *, echo: bool | None = None) -> None:
        line = self.redact(line)
        self.write_log(line)
        if self.echo if echo is None else echo:
            with _print_lock:
                self._print(self.name, line)


class CommandRunner(Protocol):
    """What the launcher needs from a node: commands, files and a shell."""

    name: str

    def wait_ready(self, timeout: float) -> None:
        """Block until commands can run (SSH answers); raise a clear error at ``timeout``."""

    def run(self, command: str, *, env: Mapping[str, str] | None = None, check: bool = True,
            quiet: bool = False, timeout: float | None = None) -> tuple[int, str]:
        """Run ``command`` with bash; returns (exit code, output tail); ``CommandError``
        on a non-zero exit when ``check``. ``quiet`` logs without echoing."""

    def put(self, local: str | os.PathLike, remote: str, *,
            copy_filter: CopyFilter = NO_FILTER) -> None:
        """Copy a file or directory to the node (like ``cp -rT``), without what
        ``copy_filter`` excludes (the config's ``rsync_exclude`` / ``rsync_filter``)."""

    def get(self, remote: str, local: str | os.PathLike, *,
            copy_filter: CopyFilter = NO_FILTER) -> None:
        """Copy a file or directory from the node (like ``cp -rT``), filtered as ``put``."""

    def shell(self, command: str | None = None) -> int:
        """Interactive shell (or ``command`` with a tty) on the node; returns its exit code."""


class SSHRunner:
    """Runs on a node over SSH; connection caching and address mapping live in ``ssh``."""

    def __init__(self, target: SSHTarget, sink: OutputSink,
                 connect_timeout: float | None = None):
        self.target = target
        self.sink = sink
        self.name = target.label
        self.connect_timeout = connect_timeout or ssh.DEFAULT_CONNECT_TIMEOUT

    def wait_ready(self, timeout: float) -> None:
        ssh.wait_for_ssh(self.target, timeout=timeout)

    def run(self, command: str, *, env: Mapping[str, str] | None = None, check: bool = True,
            quiet: bool = False, timeout: float | None = None) -> tuple[int, str]:
        self.sink.write_log(f"$ {command}")
        try:
            code, tail = ssh.run(self.target, command, env=env, check=False, timeout=timeout,
                                 connect_timeout=self.connect_timeout,
                                 stream_to=lambda line: self.sink.line(line, echo=not quiet))
        except (EOFError, OSError, paramiko.SSHException) as e:  # a cached connection died
            ssh.disconnect(self.target)
            raise SSHUnavailableError(f"node {self.name}: lost the SSH connection: "
                                      f"{type(e).__name__}: {e}") from e
        tail = self.sink.redact(tail)
        if check and code != 0:
            raise CommandError(self.name, command, code, tail)
        return code, tail

    def put(self, local: str | os.PathLike, remote: str, *,
            copy_filter: CopyFilter = NO_FILTER) -> None:
        self.sink.write_log(f"put {local} -> {remote}")
        ssh.put(self.target, local, remote, copy_filter=copy_filter)

    def get(self, remote: str, local: str | os.PathLike, *,
            copy_filter: CopyFilter = NO_FILTER) -> None:
        self.sink.write_log(f"get {remote} -> {local}")
        ssh.get(self.target, remote, local, copy_filter=copy_filter)

    def shell(self, command: str | None = None) -> int:
        return ssh.interactive_shell(self.target, command)


class LocalRunner:
    """Runs on this machine, in the node's own directory and environment (local provider).

    Paths are this machine's paths; relative ones are relative to the node directory.
    """

    def __init__(self, name: str, workdir: Path, sink: OutputSink,
                 env: Mapping[str, str] | None = None):
        self.name = name
        self.workdir = Path(workdir)
        self.sink = sink
        self.env = dict(env or {})

    def wait_ready(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _path(self, path: str | os.PathLike) -> Path:
        p = Path(os.path.expanduser(os.fspath(path)))
        return p if p.is_absolute() else self.workdir / p

    def run(self, command: str, *, env: Mapping[str, str] | None = None, check: bool = True,
            quiet: bool = False, timeout: float | None = None) -> tuple[int, str]:
        self.sink.write_log(f"$ {command}")
        full_env = {**os.environ, **self.env, **(env or {})}
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.workdir, env=full_env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.stdout is not None
        with _running_lock:
            _running.add(proc)
        tail: deque[str] = deque(maxlen=ssh.TAIL_LINES)
        timer = None
        timed_out = threading.Event()
        if timeout is not None:
            def _kill() -> None:
                timed_out.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            timer = threading.Timer(timeout, _kill)
            timer.start()
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
                line = line.rsplit("\r", 1)[-1]
                tail.append(self.sink.redact(line))
                self.sink.line(line, echo=not quiet)
            code = proc.wait()
        except BaseException:  # Ctrl-C: the command (its own session) must not run on
            _kill_group(proc)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            proc.stdout.close()
            with _running_lock:
                _running.discard(proc)
        text = "\n".join(tail)
        if timed_out.is_set():
            raise CommandTimeoutError(self.name, command, timeout or 0.0, text)
        if code < 0:  # killed by a signal: report like ssh does
            code = -1
        if check and code != 0:
            raise CommandError(self.name, command, code, text)
        return code, text

    def put(self, local: str | os.PathLike, remote: str, *,
            copy_filter: CopyFilter = NO_FILTER) -> None:
        src, dst = Path(local).expanduser(), self._path(remote)
        self.sink.write_log(f"put {src} -> {dst}")
        _copy(src, dst, copy_filter)

    def get(self, remote: str, local: str | os.PathLike, *,
            copy_filter: CopyFilter = NO_FILTER) -> None:
        src, dst = self._path(remote), Path(local).expanduser()
        self.sink.write_log(f"get {src} -> {dst}")
        _copy(src, dst, copy_filter)

    def shell(self, command: str | None = None) -> int:
        argv = ["bash"] if command is None else ["bash", "-c", command]
        return subprocess.call(argv, cwd=self.workdir, env={**os.environ, **self.env})


_running: set[subprocess.Popen] = set()   # LocalRunner commands in flight, any thread
_running_lock = threading.Lock()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def abort_running() -> None:
    """Stop every command in flight (Ctrl-C): local ones are killed, SSH connections are
    closed, so threads waiting on them return at once instead of when the command ends."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        _kill_group(proc)
    ssh.close_all()


def _copy(src: Path, dst: Path, copy_filter: CopyFilter = NO_FILTER) -> None:
    """``cp -rT``: a directory's contents are merged into ``dst``; parents are created;
    what ``copy_filter`` excludes is left out."""
    if not src.exists() and not src.is_symlink():
        raise FileNotFoundError(f"no such path {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():
        walk = copy_filter.walk_local(src)

        def ignore(directory: str, names: list[str]) -> set[str]:
            rel = Path(directory).relative_to(src).as_posix()
            rel = "" if rel == "." else rel
            return {n for n in names if walk.excluded(
                f"{rel}/{n}" if rel else n,
                os.path.isdir(os.path.join(directory, n))
                and not os.path.islink(os.path.join(directory, n)))}
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True,
                        ignore=ignore if copy_filter else None)
    else:
        if dst.is_symlink():
            dst.unlink()
        shutil.copy2(src, dst, follow_symlinks=False)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
