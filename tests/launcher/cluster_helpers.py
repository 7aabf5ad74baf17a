"""Helpers the launcher's cluster tests share: what strato runs on a test SSH host."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.harness.ssh_hosts import _first_child


def _refresh_init_pid(host) -> None:
    """Work around Host.restart() keeping a stale init_pid (its old init was still a zombie
    when the new one started), which makes run_local fail."""
    if not Path(f"/proc/{host.init_pid}/ns/ipc").exists():
        host.init_pid = _first_child(host.pid)


def strato_processes(host) -> str:
    """Command lines of strato processes on the host (its own PID namespace)."""
    _refresh_init_pid(host)
    res = host.run_local("ps -eo args", timeout=15)
    assert res.returncode == 0, res.stderr
    return "\n".join(line for line in res.stdout.splitlines()
                     if "strato.runtime" in line or "strato.launcher" in line)


def stop_strato(host) -> None:
    """Stop what strato runs on a host the launcher could not clean (by pid, on the host)."""
    _refresh_init_pid(host)
    host.run_local(f"{sys.executable} -m strato.cli stop; pid=$(cat /tmp/strato-*/monitor/"
                   "monitor.pid 2>/dev/null) && kill $pid", timeout=30)
