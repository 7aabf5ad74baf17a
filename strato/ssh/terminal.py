"""Giving the local terminal to a shell on a node (``strato attach``)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys

import paramiko

from strato.ssh.connect import (
    DEFAULT_CONNECT_TIMEOUT,
    SSHTarget,
    connected,
    endpoint,
    host_key_file,
)


# ---------------------------------------------------------------- interactive
def ssh_command_line(target: SSHTarget, command: str | None = None, *,
                     tty: bool = True) -> list[str]:
    """argv for the system ``ssh`` binary reaching ``target`` (address map applied),
    checking the node's host key against the pin file strictly."""
    host, port = endpoint(target)
    argv = [shutil.which("ssh") or "ssh", "-t" if tty else "-T", "-p", str(port),
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={host_key_file(target)}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "CheckHostIP=no",
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
    Either way the host key is verified (or pinned on first contact) by a paramiko
    connection first, so ``ssh`` finds it in the pin file.
    """
    tty = sys.stdin.isatty()
    client = connected(target, DEFAULT_CONNECT_TIMEOUT)
    if shutil.which("ssh"):
        return subprocess.call(ssh_command_line(target, command, tty=tty))
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
