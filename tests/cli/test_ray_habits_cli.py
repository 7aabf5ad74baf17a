"""What Ray users reach for, as they would type it, on three real sshd hosts: file mounts
and rsync-up/down honouring rsync_exclude / rsync_filter, get-worker-ips,
up --no-config-cache, monitor (follow, then Ctrl-C), kill-random-node (runtime, then
--hard) and cluster-dump (no token inside)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from strato.launcher.state import StateDB
from tests.harness.ssh_hosts import strato_processes

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_strato_left")]

NAME = "habits"
MOUNT = "/tmp/habits/proj"
PROJECT = {".git/HEAD": "ref", ".gitignore": "data/\n", "data/big.bin": "x" * 1000,
           "train.py": "print(1)", "src/.gitignore": "*.tmp\n", "src/x.tmp": "t",
           "src/m.py": "m"}
KEPT = [".gitignore", "src/.gitignore", "src/m.py", "train.py"]


def _cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STRATO_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "strato.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


def _files_on(host, path: str) -> list[str]:
    res = host.run_local(f"cd {path} && find . -type f | sed 's|^./||' | sort", timeout=15)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


class Follower:
    """``strato monitor`` running as a user would, its stdout collected by a thread."""

    def __init__(self, home: Path, config: Path):
        env = {**os.environ, "STRATO_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strato.cli", "monitor", str(config), "--lines", "1000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines[after:]):
                return
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            time.sleep(0.2)
        raise AssertionError(f"monitor output never showed {text!r}: {self.lines[-20:]}")

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return code, self.proc.stderr.read() if self.proc.stderr else ""


def test_ray_cli_habits_on_ssh_hosts(ssh_hosts, ssh_address_map, shared_tmp_path, tmp_path,
                                     strato_home):
    head, *workers = ssh_hosts
    project = shared_tmp_path / "proj"
    for rel, text in PROJECT.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    config = shared_tmp_path / "habits.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": NAME,
        "provider": {"type": "ssh", "head_ip": head.ip, "worker_ips": [w.ip for w in workers]},
        "auth": {"ssh_user": head.user, "ssh_private_key": head.key_path},
        "runtime_python": sys.executable,
        "autoscaler": {"tick_seconds": 1},
        "available_node_types": {
            "head": {"resources": {"CPU": 1}, "max_workers": 0},
            "worker": {"resources": {"CPU": 1}, "min_workers": 2, "max_workers": 2},
        },
        "head_node_type": "head",
        "file_mounts": {MOUNT: str(project)},
        "rsync_exclude": ["**/.git", "**/.git/**"],
        "rsync_filter": [".gitignore"],
    }))
    follower = None
    try:
        _ok(_cli(strato_home, "up", str(config), "-y"))
        for host in ssh_hosts:  # file mounts: no .git, nothing the .gitignore files name
            assert _files_on(host, MOUNT) == KEPT, host.name

        ips = _ok(_cli(strato_home, "get-worker-ips", str(config))).split()
        assert sorted(ips) == sorted(w.ip for w in workers)

        again = _ok(_cli(strato_home, "up", str(config), "-y", "--no-config-cache"))
        assert "config cache not used" in again
        assert StateDB(strato_home).get(NAME).head_address == f"{head.ip}:6380"

        # rsync-up and -down leave out the same files
        _ok(_cli(strato_home, "rsync-up", str(config), str(project), "/tmp/habits/up"))
        assert _files_on(head, "/tmp/habits/up") == KEPT
        head.run_local("mkdir -p /tmp/habits/up/data && echo y > /tmp/habits/up/data/new.bin"
                       " && mkdir -p /tmp/habits/up/.git && echo r > /tmp/habits/up/.git/x",
                       timeout=15)
        back = tmp_path / "back"
        _ok(_cli(strato_home, "rsync-down", str(config), "/tmp/habits/up", str(back)))
        assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*")
                      if p.is_file()) == KEPT

        # monitor follows the autoscaler's log on the head while a runtime is killed
        follower = Follower(strato_home, config)
        follower.wait_for("monitor of cluster 'habits' started", 30)
        seen = len(follower.lines)
        out = _ok(_cli(strato_home, "kill-random-node", str(config), "-y"))
        (killed,) = [w.ip for w in workers if f"killed {w.ip} (runtime stopped)" in out]
        victim = next(w for w in workers if w.ip == killed)
        follower.wait_for(killed, 60, after=seen)  # the autoscaler saw it and acts
        deadline = time.monotonic() + 60
        while "strato.runtime.node" not in strato_processes(victim):
            assert time.monotonic() < deadline, "the monitor did not restart the runtime"
            time.sleep(1)
        code, err = follower.interrupt()
        follower = None
        assert code == 0 and "Traceback" not in err, err

        out = _ok(_cli(strato_home, "kill-random-node", str(config), "--hard", "-y"))
        assert "machine terminated" in out
        assert len(_ok(_cli(strato_home, "get-worker-ips", str(config))).split()) == 1

        dump = tmp_path / "dump.tar.gz"
        _ok(_cli(strato_home, "cluster-dump", str(config), "-o", str(dump)))
        token = StateDB(strato_home).token(NAME)
        with tarfile.open(dump) as tar:
            names = tar.getnames()
            for member in tar.getmembers():
                if member.isfile():
                    assert token.encode() not in tar.extractfile(member).read(), member.name
        root = names[0]
        assert f"{root}/status.json" in names and f"{root}/dump.json" in names
        assert any(n.startswith(f"{root}/launcher/") for n in names)
        assert f"{root}/nodes/head-{head.ip}/monitor.log" in names
        assert any(n.startswith(f"{root}/nodes/head-{head.ip}/logs/") for n in names)
        assert any(n.startswith(f"{root}/nodes/head-{head.ip}/monitor-home-logs/")
                   and n.endswith("autoscaler-events.jsonl") for n in names)
        assert any(n.startswith(f"{root}/nodes/worker-") and "/logs/" in n for n in names)

        _ok(_cli(strato_home, "down", str(config), "-y"))
    finally:
        if follower is not None:
            follower.interrupt()
        if StateDB(strato_home).get(NAME) is not None:
            _cli(strato_home, "down", str(config), "-y")
