"""`strato up/exec/submit/rsync/status/down` against three real sshd hosts in namespaces.

The hosts share this machine's filesystem, so ``runtime_python: sys.executable`` runs
the strato under test on each of them; their /tmp is private, so files meant to be seen
by every host go under ``shared_tmp_path``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from strato import ssh
from strato.launcher import commands, reconcile
from strato.launcher.state import StateDB
from tests.harness.ssh_hosts import stop_strato, strato_processes

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_strato_left", "strato_home")]


# reads every frame on a namespace's eth0 (AF_PACKET) into a file until SIGTERM
CAPTURE = textwrap.dedent("""
    import signal, socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
    s.bind(("eth0", 0))
    s.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    with open(sys.argv[1], "wb") as f:
        print("capturing", flush=True)
        while not stop:
            try:
                f.write(s.recv(65536))
            except socket.timeout:
                pass
""")


@contextlib.contextmanager
def _capture(host, path: Path):
    """Every frame in and out of ``host`` while the block runs, raw, into ``path``."""
    proc = subprocess.Popen(["ip", "netns", "exec", host.netns, sys.executable, "-c", CAPTURE,
                             str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "capturing"
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _config(path: Path, hosts, *, name: str = "sshc") -> Path:
    head, *workers = hosts
    data = {
        "cluster_name": name,
        "provider": {"type": "ssh", "head_ip": head.ip, "worker_ips": [w.ip for w in workers]},
        "auth": {"ssh_user": head.user, "ssh_private_key": head.key_path},
        "runtime_python": sys.executable,
        "autoscaler": {"tick_seconds": 2},
        "available_node_types": {
            "head": {"resources": {"CPU": 2}, "max_workers": 0},
            "worker": {"resources": {"CPU": 2}, "min_workers": 2, "max_workers": 2},
        },
        "head_node_type": "head",
        "setup_commands": ["echo setting up on $(hostname)"],
    }
    path.write_text(yaml.safe_dump(data))
    return path


# Each task holds a whole node (2 CPUs) and waits at a file barrier in a directory every
# host sees, without `strato.get` (a task blocked in get lends its CPUs out, as in Ray):
# three tasks can only meet there by running on three different nodes at once.
SCRIPT = textwrap.dedent("""
    import json, os, socket, sys, time
    import strato

    strato.init(address="auto")

    @strato.remote(num_cpus=2)
    def where(barrier_dir, parties):
        open(os.path.join(barrier_dir, socket.gethostname() + "-" + str(os.getpid())), "w").close()
        deadline = time.time() + 60
        while len(os.listdir(barrier_dir)) < parties and time.time() < deadline:
            time.sleep(0.05)
        return socket.gethostname()

    out, barrier_dir = sys.argv[1], sys.argv[2]
    hosts = strato.get([where.remote(barrier_dir, 3) for _ in range(3)], timeout=90)
    with open(out, "w") as f:
        json.dump(hosts, f)
    print("hosts:", sorted(hosts))
""")


def test_ssh_cluster_end_to_end(ssh_hosts, ssh_address_map, shared_tmp_path, tmp_path,
                                strato_home):
    hosts = ssh_hosts
    for h in hosts:
        assert not strato_processes(h), f"{h.name} is not idle"
    config = _config(shared_tmp_path / "cluster.yaml", hosts)
    try:
        result = reconcile.up(config, yes=True)
        assert result.head_address == f"{hosts[0].ip}:6380"
        assert sorted(result.created) == sorted(h.ip for h in hosts)

        # a second `up` creates nothing and restarts nothing
        again = reconcile.up(config, yes=True)
        assert again.created == [] and again.terminated == [] and again.bootstrapped == []

        # exec on every node: three distinct hostnames, exit codes propagate
        seen = shared_tmp_path / "hostnames"
        assert commands.exec_(config, f"hostname >> {seen}", node="all") == 0
        assert sorted(seen.read_text().split()) == sorted(h.hostname for h in hosts)
        assert commands.exec_(config, "exit 7", node=hosts[2].ip) == 7

        # submit: tasks land on every host
        script = tmp_path / "where.py"
        script.write_text(SCRIPT)
        # task specs cross machines (the barrier path is in their pickled arguments):
        # on the head's wire they are TLS records only, never readable
        canary = "barrier-canary-5e1f0c"
        out, barrier = shared_tmp_path / "where.json", shared_tmp_path / canary
        barrier.mkdir()
        wire = tmp_path / "head-eth0.raw"
        with _capture(hosts[0], wire):
            assert commands.submit(config, script, [str(out), str(barrier)]) == 0
        assert set(json.loads(out.read_text())) == {h.hostname for h in hosts}
        captured = wire.read_bytes()
        assert b"\x17\x03\x03" in captured              # TLS application data went by
        assert canary.encode() not in captured
        assert b"strato.runtime" not in captured and b"cloudpickle" not in captured

        # rsync both ways through the head's private /tmp
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "a.txt").write_text("alpha")
        (src / "sub" / "b.txt").write_text("beta")
        commands.rsync_up(config, str(src), "/tmp/strato-rsync")
        assert commands.exec_(config, "test \"$(cat /tmp/strato-rsync/sub/b.txt)\" = beta") == 0
        assert hosts[1].run_local("test -e /tmp/strato-rsync").returncode != 0  # head only
        back = tmp_path / "back"
        commands.rsync_down(config, "/tmp/strato-rsync", str(back))
        assert (back / "a.txt").read_text() == "alpha"
        assert (back / "sub" / "b.txt").read_text() == "beta"

        info = commands.status(config)
        assert {n["ip"] for n in info["nodes"]} == {h.ip for h in hosts}
        assert all(n["runtime"] == "alive" and n["status"] == "up-to-date"
                   for n in info["nodes"]), info["nodes"]
        assert commands.get_head_ip(config) == hosts[0].ip
        head_logs = commands.logs(config)
        assert "strato head started" in head_logs and "monitor of cluster" in head_logs
        token = StateDB().token("sshc")
        assert token and token not in head_logs and "token: ***" in head_logs
        for f in (strato_home / "logs").rglob("*"):
            assert not f.is_file() or token not in f.read_text(), f
        secret = StateDB().token_path("sshc")
        assert secret.stat().st_mode & 0o777 == 0o600
        assert "strato.launcher.monitor" in strato_processes(hosts[0])

        # the monitor (on the head, reaching workers over SSH) restarts a vanished runtime
        assert hosts[1].run_local(f"{sys.executable} -m strato.cli stop").returncode == 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = {n["ip"]: n["runtime"] for n in commands.status(config)["nodes"]}
            if "strato.runtime.node" in strato_processes(hosts[1]) and \
                    nodes[hosts[1].ip] == "alive":
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the monitor did not restart the runtime on h3: {nodes}")

        # a partitioned worker: a clear error naming it, and `down` still cleans up
        hosts[2].link_down()
        ssh.close_all()  # as a fresh `strato exec` process would: no cached connection
        started = time.monotonic()
        assert commands.exec_(config, "true", node=hosts[2].ip) == 255
        assert time.monotonic() - started < 40
        reconcile.down(config, yes=True)
        assert StateDB().get("sshc") is None
        assert not (strato_home / "logs" / "sshc").exists()
        for h in hosts[:2]:
            assert not strato_processes(h), h.name
    finally:
        hosts[2].link_up()
        if StateDB().get("sshc") is not None:
            reconcile.down(config, yes=True)
        stop_strato(hosts[2])  # down could not reach it (no_strato_left checks the rest)


def test_failing_setup_names_the_command_and_down_cleans_up(ssh_hosts, ssh_address_map,
                                                            shared_tmp_path, strato_home):
    config = _config(shared_tmp_path / "cluster.yaml", ssh_hosts[:1], name="sshbad")
    data = yaml.safe_load(config.read_text())
    data["available_node_types"]["worker"]["min_workers"] = 0
    data["head_setup_commands"] = ["echo about to fail; exit 42"]
    config.write_text(yaml.safe_dump(data))
    try:
        with pytest.raises(Exception) as info:
            reconcile.up(config, yes=True)
        msg = str(info.value)
        assert "exit 42" in msg and "about to fail" in msg and "exit 42" in msg
        status = commands.status(config)
        assert [n["status"] for n in status["nodes"]] == ["update-failed"]
    finally:
        reconcile.down(config, yes=True)
    assert StateDB().get("sshbad") is None
    assert not strato_processes(ssh_hosts[0])
