"""The cluster commands of the `strato` CLI, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home() -> Path:
    path = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))  # short: node socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def strato(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STRATO_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "strato.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _local(path: Path, name: str) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": name,
        "provider": {"type": "local", "monitor": "off"},
        "available_node_types": {"head": {"resources": {"CPU": 1}},
                                 "cpu": {"resources": {"CPU": 1}, "max_workers": 2}},
        "head_node_type": "head",
        "head_start_ray_commands": ["ray start --head"],  # Ray-only: a warning
    }))
    return path


def test_typo_in_config_fails_clearly_and_creates_nothing(tmp_path, home):
    config = tmp_path / "bad.yaml"
    config.write_text("cluster_name: bad\nprovider:\n  type: local\n"
                      "avaliable_node_types:\n  head: {}\nhead_node_type: head\n")
    for command in (["up", "-y"], ["status"], ["down", "-y"], ["exec", "true"]):
        res = strato(home, command[0], str(config), *command[1:])
        assert res.returncode != 0, command
        assert "avaliable_node_types" in res.stderr and "available_node_types" in res.stderr
        assert f"{config}:4" in res.stderr
        assert "Traceback" not in res.stderr + res.stdout
    assert not list(home.iterdir())  # no state, no nodes


def test_cli_local_cluster_round_trip(tmp_path, home):
    config = _local(tmp_path / "c.yaml", "cli")
    res = strato(home, "exec", str(config), "true")
    assert res.returncode == 1 and "no head node" in res.stderr
    assert "Traceback" not in res.stderr

    res = strato(home, "up", str(config), "-y", "--min-workers", "1")
    try:
        assert res.returncode == 0, res.stderr + res.stdout
        assert "head_start_ray_commands" in res.stderr and "warning" in res.stderr
        token = (home / "secrets" / "cli.token").read_text().strip()
        assert "listening at" in res.stdout and "joined" in res.stdout
        logs = "".join(f.read_text() for f in (home / "logs" / "cli").glob("*.log"))
        assert "token: ***" in logs  # `strato start`'s lines are kept in the log, redacted
        assert token and token not in res.stdout + res.stderr + logs

        res = strato(home, "status", str(config), "--json")
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert sorted(n["kind"] for n in info["nodes"]) == ["head", "worker"]
        for node in info["nodes"]:
            assert {"id", "type", "kind", "state", "ip", "spot", "uptime"} <= set(node)
            assert node["runtime"] == "alive"
        table = strato(home, "status", str(config))
        assert table.returncode == 0 and "up-to-date" in table.stdout

        res = strato(home, "exec", str(config), "echo on $STRATO_ADDRESS; exit 3", "--node",
                     "all")
        assert res.returncode == 3
        assert res.stdout.count(f"on {info['head_address']}") == 2
        # one node: its output as it is (no [head:...] prefix, no markup), as with ssh
        res = strato(home, "exec", str(config), "printf 'a b\\n[x] y\\n'")
        assert res.returncode == 0 and res.stdout == "a b\n[x] y\n", res.stdout

        script = tmp_path / "hello.py"
        script.write_text("import sys, strato\nstrato.init(address='auto')\n"
                          "print('args', sys.argv[1:], len(strato.nodes()))\n")
        res = strato(home, "submit", str(config), str(script), "--", "--lr", "3e-4")
        assert res.returncode == 0, res.stderr
        assert "args ['--lr', '3e-4'] 2" in res.stdout

        res = strato(home, "get-head-ip", str(config))
        assert res.stdout.strip() == "127.0.0.1"
        (tmp_path / "up.txt").write_text("payload")
        assert strato(home, "rsync-up", str(config), str(tmp_path / "up.txt"),
                      "data/up.txt").returncode == 0
        assert strato(home, "rsync-down", str(config), "data/up.txt",
                      str(tmp_path / "down.txt")).returncode == 0
        assert (tmp_path / "down.txt").read_text() == "payload"
        res = strato(home, "logs", str(config))
        assert "strato head started" in res.stdout
    finally:
        res = strato(home, "down", str(config), "-y")
    assert res.returncode == 0, res.stderr
    assert not (home / "local" / "cli").exists()


def test_attach_opens_an_interactive_shell_on_the_head(tmp_path, home):
    """`strato attach` in a real terminal: type a command, see its output, exit cleanly."""
    pexpect = pytest.importorskip("pexpect")
    config = _local(tmp_path / "a.yaml", "att")
    res = strato(home, "up", str(config), "-y")
    try:
        assert res.returncode == 0, res.stderr + res.stdout
        env = {**os.environ, "STRATO_HOME": str(home), "PS1": "$ "}
        child = pexpect.spawn(sys.executable, ["-m", "strato.cli", "attach", str(config)],
                              env=env, encoding="utf-8", timeout=30)
        try:
            child.sendline("echo attached-$((6*7))")
            child.expect("attached-42")
            child.sendline("exit 0")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 0
    finally:
        down = strato(home, "down", str(config), "-y")
    assert down.returncode == 0, down.stderr
