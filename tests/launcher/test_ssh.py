"""The SSH command layer and the SSH provider against real sshd hosts in namespaces."""

from __future__ import annotations

import base64
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from strato import ssh
from strato.exceptions import CapacityError, CommandError, SSHUnavailableError
from strato.providers.base import TAG_CLUSTER, TAG_KIND, TAG_NODE_TYPE, NodeState, NodeTypeSpec
from strato.providers.ssh import SSHProvider
from strato.ssh import connect
from tests.harness.ssh_hosts import SOURCE_ROOT

pytestmark = pytest.mark.usefixtures("strato_home")


def test_runs_on_three_hosts_in_parallel_with_distinct_hostnames(ssh_hosts, capsys,
                                                                strato_home):
    results: dict[str, list[str]] = {}

    def one(host):
        lines: list[str] = []
        ssh.run(host.target(), "hostname", stream_to=lines.append)
        results[host.name] = lines

    threads = [threading.Thread(target=one, args=(h,)) for h in ssh_hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert {h.name: [h.hostname] for h in ssh_hosts} == results
    assert len({h.hostname for h in ssh_hosts}) == 3

    ssh.disconnect(ssh_hosts[0].target())
    ssh.run(ssh_hosts[0].target(), "echo hello")  # default sink: "[name] line"
    assert f"[{ssh_hosts[0].hostname}] hello" in capsys.readouterr().out
    known_hosts = ssh.known_hosts_path()  # accepted and recorded, never checked
    assert ssh_hosts[0].ip in known_hosts.read_text()
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600


def test_exit_code_propagates_and_command_error_carries_the_tail(ssh_hosts):
    target = ssh_hosts[1].target(name="worker-1")
    code, tail = ssh.run(target, "echo out; echo err >&2; exit 3", check=False,
                         stream_to=ssh.silent)
    assert code == 3
    assert tail.splitlines() == ["out", "err"]

    with pytest.raises(CommandError) as info:
        ssh.run(target, "for i in $(seq 100); do echo line$i; done; exit 7",
                stream_to=ssh.silent)
    err = info.value
    assert (err.node, err.exit_code) == ("worker-1", 7)
    assert err.output_tail.splitlines()[-1] == "line100"
    assert len(err.output_tail.splitlines()) == ssh.TAIL_LINES  # a tail, not everything
    assert "worker-1" in str(err) and "exit 7" in str(err)

    assert ssh.run(target, "kill -9 $$", check=False, stream_to=ssh.silent)[0] == -1
    with pytest.raises(CommandError, match="killed by a signal"):
        ssh.run(target, "kill -9 $$", stream_to=ssh.silent)


def test_env_reaches_the_command_but_never_the_log_or_ps(ssh_hosts, tmp_path):
    host = ssh_hosts[0]
    secret = "tok-" + os.urandom(8).hex()
    weird = "a 'b' \"c\"\n$HOME `x` ;"
    log_file = tmp_path / "logs" / "node.log"
    lines: list[str] = []
    ssh.run(host.target(), 'ps -eo args; echo "len=${#STRATO_TOKEN}"; '
            'printf %s "$WEIRD" | base64 -w0; echo',
            env={"STRATO_TOKEN": secret, "WEIRD": weird}, log_file=log_file,
            stream_to=lines.append)
    assert f"len={len(secret)}" in lines
    assert base64.b64encode(weird.encode()).decode() in lines
    text = log_file.read_text()
    assert "len=" in text and secret not in text and secret not in "\n".join(lines)
    assert ".strato-env-" not in host.run_local("ls -a /tmp").stdout  # env file removed
    with pytest.raises(ValueError, match="BAD-NAME"):
        ssh.run(host.target(), "true", env={"BAD-NAME": "x"})


def test_timeout_and_pty(ssh_hosts):
    target = ssh_hosts[0].target()
    started = time.monotonic()
    with pytest.raises(ssh.CommandTimeoutError, match="timed out after 0.5s"):
        ssh.run(target, "echo started; sleep 30", timeout=0.5, stream_to=ssh.silent)
    assert time.monotonic() - started < 5
    code, tail = ssh.run(target, 'tty; echo "$X"', pty=True, env={"X": "via-pty"},
                         stream_to=ssh.silent)
    assert code == 0 and tail.splitlines()[0].startswith("/dev/pts/")
    assert tail.splitlines()[-1] == "via-pty"


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes(), stat.S_IMODE(p.stat().st_mode) & 0o100)
    return out


def test_put_get_directory_round_trip_through_a_host_private_tmp(ssh_hosts, tmp_path,
                                                                  shared_tmp_path):
    host = ssh_hosts[2]
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (src / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "sub" / "deeper" / "run.sh").chmod(0o755)
    (src / "link").symlink_to("a.txt")

    remote = f"/tmp/strato-rt-{os.getpid()}/copy"  # exists only in the host's private /tmp
    ssh.put(host.target(), src, remote)
    assert not Path(remote).exists()
    assert host.run_local(f"cat {remote}/a.txt && {remote}/sub/deeper/run.sh").stdout == \
        "alpha\nhi\n"

    back = tmp_path / "back"
    ssh.get(host.target(), remote, back)
    assert _tree(back) == _tree(src)

    # A single file into a missing directory on the shared filesystem.
    ssh.put(host.target(), src / "a.txt", f"{shared_tmp_path}/x/y/a.txt")
    assert (shared_tmp_path / "x" / "y" / "a.txt").read_text() == "alpha\n"
    with pytest.raises(ssh.FileTransferError, match="no/such"):
        ssh.get(host.target(), "/no/such/path", tmp_path / "nothing")


def test_wait_for_ssh_on_a_partitioned_host_names_it(ssh_hosts):
    host = ssh_hosts[2]
    target = host.target(name="worker-x")
    ssh.wait_for_ssh(target, timeout=10)
    ssh.disconnect(target)  # a cached live connection would count as available
    host.link_down()
    try:
        started = time.monotonic()
        with pytest.raises(SSHUnavailableError) as info:
            ssh.wait_for_ssh(target, timeout=1.5)
        assert time.monotonic() - started < 6
        assert "worker-x" in str(info.value) and host.ip in str(info.value)
        assert "last error" in str(info.value)
    finally:
        host.link_up()
    ssh.wait_for_ssh(target, timeout=15)
    assert ssh.run(target, "hostname", stream_to=ssh.silent)[1] == host.hostname


def test_strict_address_map_refuses_unmapped_addresses_without_connecting(
        ssh_hosts, ssh_address_map, monkeypatch):
    def no_connect(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    cloud = ssh.SSHTarget(host="54.12.34.56", user="root", key_path=ssh_hosts[0].key_path,
                          name="head")
    with monkeypatch.context() as m:
        m.setattr(connect, "_open_client", no_connect)
        m.setattr("socket.create_connection", no_connect)
        for call in (lambda: ssh.wait_for_ssh(cloud, timeout=5),
                     lambda: ssh.run(cloud, "true"),
                     lambda: ssh.put(cloud, __file__, "/var/tmp/x"),
                     lambda: ssh.ssh_command_line(cloud)):
            with pytest.raises(ssh.AddressNotMappedError, match="54.12.34.56"):
                call()

    ssh_address_map.add("54.12.34.56", ssh_hosts[0])
    assert ssh.resolve_address("54.12.34.56") == (ssh_hosts[0].ip, 22)
    assert ssh.run(cloud, "hostname", stream_to=ssh.silent)[1] == ssh_hosts[0].hostname

    by_id = ssh.SSHTarget(host="35.1.2.3", node_id="i-0abc", user="root",
                          key_path=ssh_hosts[1].key_path)
    ssh_address_map.add("i-0abc", ssh_hosts[1])
    assert ssh.run(by_id, "hostname", stream_to=ssh.silent)[1] == ssh_hosts[1].hostname
    assert ssh.resolve_address(ssh_hosts[2].ip) == (ssh_hosts[2].ip, 22)  # harness identity


def test_resolve_address_without_a_map_passes_through(monkeypatch):
    monkeypatch.delenv("STRATO_SSH_ADDRESS_MAP", raising=False)
    monkeypatch.delenv("STRATO_SSH_ADDRESS_MAP_STRICT", raising=False)
    assert ssh.resolve_address("1.2.3.4", port=2222) == ("1.2.3.4", 2222)
    ssh.set_address_map({"1.2.3.4": "[::1]:2200", "i-1": "10.0.0.9"}, strict=True)
    try:
        assert ssh.resolve_address("1.2.3.4") == ("::1", 2200)
        assert ssh.resolve_address("5.6.7.8", "i-1", port=23) == ("10.0.0.9", 23)
        with pytest.raises(ssh.AddressNotMappedError):
            ssh.resolve_address("5.6.7.8")
    finally:
        ssh.set_address_map(None)


def test_interactive_shell_passes_the_exit_code(ssh_hosts, capfd):
    assert ssh.interactive_shell(ssh_hosts[1].target(), "hostname; exit 4") == 4
    assert ssh_hosts[1].hostname in capfd.readouterr().out


HEAD = NodeTypeSpec(name="head", node_config={})
GPU = NodeTypeSpec(name="gpu-worker", node_config={})


def _tags(kind: str, node_type: str) -> dict[str, str]:
    return {TAG_KIND: kind, TAG_NODE_TYPE: node_type}


def test_ssh_provider_claims_lists_and_releases_hosts(ssh_hosts, shared_tmp_path,
                                                      strato_home):
    head, w1, w2 = ssh_hosts
    config = {"type": "ssh", "head_ip": head.ip, "worker_ips": [w1.ip, w2.ip],
              "ssh_user": "root", "ssh_private_key": head.key_path,
              "stop_command": f"touch {shared_tmp_path}/stopped-$(hostname)"}
    provider = SSHProvider(config, "c1")

    [h] = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    assert (h.id, h.state, h.private_ip) == (head.ip, NodeState.RUNNING, head.ip)
    assert h.tags[TAG_CLUSTER] == "c1"
    workers = provider.create_nodes(GPU, 2, _tags("worker", "gpu-worker"))
    assert [n.id for n in workers] == [w1.ip, w2.ip]
    with pytest.raises(CapacityError) as info:
        provider.create_nodes(GPU, 1, _tags("worker", "gpu-worker"))
    assert info.value.node_type == "gpu-worker" and "gpu-worker" in str(info.value)
    with pytest.raises(CapacityError):
        provider.create_nodes(HEAD, 1, _tags("head", "head"))

    state_file = strato_home / "ssh" / "c1.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    again = SSHProvider(config, "c1")  # another process's view: the state file
    assert {n.id for n in again.list_nodes({TAG_KIND: "worker"})} == {w1.ip, w2.ip}
    again.set_tags(w1.ip, {"strato-status": "up-to-date"})
    assert provider.list_nodes({"strato-status": "up-to-date"})[0].id == w1.ip
    assert SSHProvider(config, "other").list_nodes() == []

    provider.terminate_nodes([w1.ip, "10.255.255.255"])  # unknown ids are ignored
    assert (shared_tmp_path / f"stopped-{w1.hostname}").exists()
    assert not (shared_tmp_path / f"stopped-{w2.hostname}").exists()
    assert {n.id for n in provider.list_nodes()} == {head.ip, w2.ip}
    [replacement] = provider.create_nodes(GPU, 1, _tags("worker", "gpu-worker"))
    assert replacement.id == w1.ip and replacement.tags.get("strato-status") is None
    provider.terminate_nodes([n.id for n in provider.list_nodes()])
    assert provider.list_nodes() == []


def test_ssh_provider_never_contacts_hosts_to_create_and_claims_atomically(
        ssh_address_map, monkeypatch):
    monkeypatch.setattr(connect, "_open_client", lambda *a, **k: pytest.fail("connected"))
    workers = [f"192.0.2.{i}" for i in range(10, 14)]
    config = {"head_ip": "192.0.2.1", "worker_ips": workers, "stop_command": ""}
    claimed: list[str] = []
    failures: list[Exception] = []

    def claim() -> None:
        try:
            claimed.extend(n.id for n in SSHProvider(config, "race").create_nodes(
                GPU, 1, _tags("worker", "gpu-worker")))
        except CapacityError as e:
            failures.append(e)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == workers and len(failures) == 2
    SSHProvider(config, "race").terminate_nodes(workers)  # stop_command "" : no SSH


_SOURCE_UNDER_TMP = ({SOURCE_ROOT.parts[2]} if SOURCE_ROOT.parts[:2] == ("/", "tmp")
                     else set())


def test_hosts_run_this_python_and_restart_kills_what_ssh_started(ssh_hosts, ssh_host_network):
    """What the launcher relies on: strato importable via sys.executable, hosts reach each
    other and this machine, private /tmp and PIDs, and restart() as the cleanup."""
    import socket
    import sys

    a, b = ssh_hosts[0], ssh_hosts[1]
    server = socket.create_server((ssh_host_network.bridge_ip, 0))
    port = server.getsockname()[1]
    try:
        code = (f"import socket, strato; socket.create_connection("
                f"('{ssh_host_network.bridge_ip}', {port}), timeout=5).sendall(b'hi')")
        ssh.run(a.target(), f"{sys.executable} -c \"{code}\"", stream_to=ssh.silent)
        server.settimeout(5)
        conn, _ = server.accept()
        assert conn.recv(2) == b"hi"
        conn.close()
    finally:
        server.close()
    assert ssh.run(a.target(), f"getent hosts {b.hostname} && timeout 5 bash -c "
                   f"'</dev/tcp/{b.hostname}/22'", stream_to=ssh.silent)[0] == 0

    # A daemonised process (output redirected, so the channel closes at once).
    ssh.run(a.target(), "nohup sleep 600 >/tmp/sleep.log 2>&1 </dev/null & echo $! > /tmp/pid",
            stream_to=ssh.silent, timeout=10)
    assert "sleep 600" in a.run_local("ps -eo args").stdout
    assert "sleep 600" not in b.run_local("ps -eo args").stdout
    assert "pid" not in b.run_local("ls /tmp").stdout
    a.restart()
    assert "sleep 600" not in a.run_local("ps -eo args").stdout
    left = set(a.run_local("ls /tmp").stdout.split())
    assert left <= _SOURCE_UNDER_TMP  # only the bound-in strato source, when it lives there
    ssh.disconnect(a.target())
    assert ssh.run(a.target(), "hostname", stream_to=ssh.silent)[1] == a.hostname


def test_a_node_vanishing_mid_command_raises_instead_of_hanging(ssh_hosts, monkeypatch):
    host = ssh_hosts[1]
    target = host.target(name="spot-1")
    monkeypatch.setattr(connect, "KEEPALIVE_SECONDS", 1)
    monkeypatch.setattr(connect, "DEAD_PEER_SECONDS", 3)
    ssh.disconnect(target)
    lines: list[str] = []
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            ssh.run(target, "echo working; sleep 60", stream_to=lines.append)
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
    host.link_down()
    try:
        worker.join(timeout=30)
    finally:
        host.link_up()
    assert not worker.is_alive()
    [err] = outcome
    assert isinstance(err, CommandError) and err.exit_code == -1
    assert "working" in err.output_tail and "connection lost" in err.output_tail
    host.run_local("pkill -f 'sleep 60'")  # only this host's PID namespace
    ssh.wait_for_ssh(target, timeout=15)
    ssh.disconnect(target)  # drop the connection made with the shortened timeouts
