"""The serverless client against three real sshd hosts whose head accepts nothing but SSH
from the laptop's side (iptables in the head's namespace: loopback, established
connections, the other hosts, and port 22; everything else dropped), so the test proves
the client needs nothing but SSH: auto-up, attach, prints, ``.map``, 100 MB both ways
through the tunnel, a durable call fetched by a second process after the first exited.
"""

from __future__ import annotations

import ast
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from strato.launcher import reconcile
from tests.client.helpers import ok, run_client, said, write_script
from tests.harness.ssh_hosts import INSTALL_SCRIPT, stop_strato

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def strato_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("STRATO_HOME", str(home))
    return home


def _iptables(host, *rule: str) -> None:
    subprocess.run(["ip", "netns", "exec", host.netns, "iptables", *rule], check=True,
                   capture_output=True, timeout=30)


@pytest.fixture
def ssh_only_head(ssh_hosts):
    """The head's namespace drops every packet from the laptop's side but SSH."""
    if not shutil.which("iptables"):
        subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, timeout=600)
    if not shutil.which("iptables"):
        pytest.fail(f"iptables is missing and {INSTALL_SCRIPT.name} could not install it")
    head, *others = ssh_hosts
    rules = [["-i", "lo", "-j", "ACCEPT"],
             ["-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
             *[["-s", h.ip, "-j", "ACCEPT"] for h in others],
             ["-p", "tcp", "--dport", str(head.port), "-j", "ACCEPT"],
             ["-j", "DROP"]]
    for rule in rules:
        _iptables(head, "-A", "INPUT", *rule)
    try:
        yield head
    finally:
        _iptables(head, "-F", "INPUT")


def _config(path: Path, hosts) -> Path:
    head, *workers = hosts
    path.write_text(yaml.safe_dump({
        "cluster_name": "sshclient",
        "provider": {"type": "ssh", "head_ip": head.ip, "worker_ips": [w.ip for w in workers]},
        "auth": {"ssh_user": head.user, "ssh_private_key": head.key_path},
        "runtime_python": sys.executable,
        "available_node_types": {
            "head": {"resources": {"CPU": 1}, "max_workers": 0},
            "worker": {"resources": {"CPU": 2, "w": 1}, "min_workers": 2, "max_workers": 2},
        },
        "head_node_type": "head"}))
    return path


def test_client_over_ssh_only(ssh_hosts, ssh_only_head, ssh_address_map, shared_tmp_path,
                              strato_home, tmp_path):
    head = ssh_only_head
    config = _config(shared_tmp_path / "cluster.yaml", ssh_hosts)
    first = write_script(tmp_path / "first.py", """
        import socket
        import numpy as np
        t = time.time()
        strato.init(cluster=CONFIG)
        print("cold start", round(time.time() - t, 2), flush=True)
        @strato.remote(resources={"w": 1})
        def where(x):
            print("on", socket.gethostname(), x)
            return socket.gethostname()
        @strato.remote(resources={"w": 1})
        def double(a):
            return a * 2
        hosts = list(where.map(range(200)))
        assert len(hosts) == 200
        say("HOSTS", sorted(set(hosts)))
        big = np.arange(100 * 1024 * 1024 // 8, dtype=np.int64)
        t = time.time()
        out = strato.get(double.remote(big))       # 100 MB there and back, via a worker
        assert out.shape == big.shape and int(out[-1]) == 2 * int(big[-1])
        print("100MB round trip", round(time.time() - t, 2))
        call = where.spawn("durable")
        say("ID", call.id)
        os._exit(0)
    """)
    try:
        out = ok(run_client(first, config, timeout=200))
        print(out)
        assert "running `strato up`" in out
        assert len(ast.literal_eval(said(out, "HOSTS"))) == 2
        assert "(where pid=" in out and "on strato-h" in out   # prints came home
        call_id = said(out, "ID")

        # nothing but SSH reaches the head from here
        for port in (6380, 22):
            try:
                socket.create_connection((head.ip, port), timeout=2).close()
                reachable = True
            except OSError:
                reachable = False
            assert reachable == (port == 22), port

        second = write_script(tmp_path / "second.py", """
            t = time.time()
            strato.init(cluster=CONFIG)
            say("attach", round(time.time() - t, 2))
            say("GOT", strato.FunctionCall.from_id(sys.argv[2]).get(timeout=60))
            strato.shutdown()
        """)
        out = ok(run_client(second, config, call_id, timeout=90))
        print(out)
        assert "strato up" not in out and "GOT strato-h" in out
    finally:
        try:
            reconcile.down(config, yes=True)
        finally:
            for host in ssh_hosts:
                stop_strato(host)
