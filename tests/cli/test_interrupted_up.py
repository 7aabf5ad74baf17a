"""The launcher under faults, on the local provider: Ctrl-C in the middle of `strato up`
(head setup, worker setup) leaves a state the next `up` or `down` completes, and a
missing local path is a clear error, not a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from strato.launcher.state import StateDB
from strato.providers.local import LocalProvider

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("monitor_off")]
CLI = [sys.executable, "-m", "strato.cli"]


def _config(path: Path, marks: Path) -> Path:
    # setup blocks (and says where it is) until the test lets it through with `go`
    block = (f"test -e {marks}/go || {{ touch {marks}/$STAGE; "
             f"for i in $(seq 300); do test -e {marks}/go && break; sleep 0.1; done; }}")
    path.write_text(yaml.safe_dump({
        "cluster_name": "intr",
        "provider": {"type": "local"},
        "available_node_types": {
            "head": {"resources": {"CPU": 1}, "max_workers": 0},
            "worker": {"resources": {"CPU": 1}, "min_workers": 1, "max_workers": 1},
        },
        "head_node_type": "head",
        "head_setup_commands": [f"STAGE=head-setup; {block}"],
        "worker_setup_commands": [f"STAGE=worker-setup; {block}"],
    }))
    return path


def _interrupt_up_at(config: Path, marks: Path, stage: str) -> subprocess.CompletedProcess:
    """Run `strato up`, press Ctrl-C (SIGINT to its process group) once ``stage`` runs."""
    proc = subprocess.Popen([*CLI, "up", "-y", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks / stage).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - started < 10, "Ctrl-C waited for the setup to finish"
        (marks / stage).unlink()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _strato_processes(home: Path) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(home) in cmd:
            found.append(p.info["pid"])
    return found


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_ctrl_c_in_up_then_up_or_down_completes(short_strato_home, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    config = _config(tmp_path / "c.yaml", marks)
    provider = LocalProvider({}, "intr")

    # 1. Ctrl-C while the head is being set up (it exists, tagged setting-up)
    res = _interrupt_up_at(config, marks, "head-setup")
    assert res.returncode == 130 and "interrupted" in res.stdout
    assert "Traceback" not in res.stdout
    [head] = provider.list_nodes()
    assert head.tags["strato-status"] == "setting-up"

    # the next `up` completes it: head set up, the worker created and set up
    (marks / "go").touch()
    res = _cli("up", "-y", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    nodes = provider.list_nodes()
    assert sorted(n.kind for n in nodes) == ["head", "worker"]
    assert all(n.tags["strato-status"] == "up-to-date" and n.is_alive for n in nodes)
    assert _cli("exec", str(config), "echo fine").stdout.strip() == "fine"
    assert _cli("down", "-y", str(config)).returncode == 0
    assert provider.list_nodes() == [] and StateDB().get("intr") is None

    # 2. Ctrl-C while a worker is being set up; `down` alone cleans everything up
    (marks / "go").unlink()
    res = _interrupt_up_at(config, marks, "worker-setup")
    assert res.returncode == 130 and "Traceback" not in res.stdout
    assert sorted(n.kind for n in provider.list_nodes()) == ["head", "worker"]
    res = _cli("down", "-y", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    assert provider.list_nodes() == []
    assert not (short_strato_home / "local" / "intr").exists()
    deadline = time.monotonic() + 10
    while _strato_processes(short_strato_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _strato_processes(short_strato_home) == []


def test_missing_local_paths_are_clear_errors(short_strato_home, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "mounts", "provider": {"type": "local"},
        "available_node_types": {"head": {"resources": {"CPU": 1}}}, "head_node_type": "head",
        "file_mounts": {"/tmp/data": str(tmp_path / "no-such-dir")}}))
    res = _cli("up", "-y", str(config))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"no such local path '{tmp_path / 'no-such-dir'}'" in res.stderr
    assert "file_mounts" in res.stderr
    assert LocalProvider({}, "mounts").list_nodes() == []  # checked before creating anything

    res = _cli("rsync-up", str(config), str(tmp_path / "missing.txt"), "/tmp/x")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "rsync-up: no such local path" in res.stderr
