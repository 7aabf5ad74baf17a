"""SSH host keys: pinned per cluster and node on first contact, verified after (also by
the ``ssh`` binary of ``attach``), the user's known_hosts honoured for SSH-provider hosts,
and a changed key a clear error that sends nothing to the node."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from strato import ssh
from strato.exceptions import HostKeyMismatchError
from strato.launcher import commands, reconcile
from strato.launcher.cluster import open_cluster
from tests.harness.ssh_hosts import _refresh_init_pid

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("strato_home", "monitor_off")]


def _pins(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def test_first_contact_pins_a_changed_key_is_refused_a_new_node_is_pinned_afresh(
        ssh_hosts, tmp_path):
    host = ssh_hosts[2]
    pins = tmp_path / "pins" / "c.known_hosts"
    target = ssh.SSHTarget(host="54.1.2.3", node_id="i-1", user=host.user,
                           key_path=host.key_path, name="worker:54.1.2.3",
                           known_hosts=str(pins))
    ssh.set_address_map({"i-1": f"{host.ip}:22", "i-2": f"{host.ip}:22"}, strict=True)
    try:
        ssh.run(target, "true", stream_to=ssh.silent)
        [line] = _pins(pins)
        # OpenSSH format, under the address really dialed (after the map), with the node id
        assert line[:3] == [host.ip, *host.host_public_key().split()]
        assert line[3] == "strato-node=i-1"
        assert stat.S_IMODE(pins.stat().st_mode) == 0o600
        before = pins.read_text()

        host.new_host_key()  # reinstalled, or someone else at its address
        _refresh_init_pid(host)
        ssh.close_all()
        marker = "/tmp/strato-host-key-marker"
        with pytest.raises(HostKeyMismatchError) as info:
            ssh.run(target, f"touch {marker}", stream_to=ssh.silent)
        err = info.value
        message = str(err)
        assert "worker:54.1.2.3" in message and "i-1" in message and host.ip in message
        assert err.expected.split()[1] in message and err.got.split()[1] in message
        assert err.expected != err.got and err.got.startswith("ssh-ed25519 SHA256:")
        assert f"ssh-keygen -R {host.ip} -f {pins}" in message and "strato down" in message
        assert host.run_local(f"test -e {marker}").returncode == 1  # nothing ran there
        assert pins.read_text() == before                           # the pin stands

        # a booting-machine wait does not retry a wrong key for minutes: it fails at once
        with pytest.raises(HostKeyMismatchError):
            ssh.wait_for_ssh(target, timeout=30)

        # a replaced node (new instance id at the reused address) is pinned afresh
        replaced = ssh.SSHTarget(host="54.1.2.3", node_id="i-2", user=host.user,
                                 key_path=host.key_path, known_hosts=str(pins))
        assert ssh.run(replaced, "echo ok", stream_to=ssh.silent)[1] == "ok"
        [line] = _pins(pins)  # the gone node's line for that address was dropped
        assert line[3] == "strato-node=i-2" and line[2] == host.host_public_key().split()[1]
    finally:
        ssh.set_address_map(None)
        ssh.close_all()


def _cluster_config(path: Path, hosts, **provider) -> Path:
    head, worker = hosts
    path.write_text(yaml.safe_dump({
        "cluster_name": "keys",
        "provider": {"type": "ssh", "head_ip": head.ip, "worker_ips": [worker.ip],
                     **provider},
        "auth": {"ssh_user": head.user, "ssh_private_key": head.key_path},
        "runtime_python": sys.executable,
        "available_node_types": {"head": {"resources": {"CPU": 1}, "max_workers": 0}},
        "head_node_type": "head",
    }))
    return path


def _claim_head(config: Path):
    """The head host claimed as `up` would, without setting it up (no host contacted)."""
    from strato.launcher.config import load_config

    cluster = open_cluster(config)
    spec = load_config(config).node_type_spec("head")
    [head] = cluster.provider.create_nodes(spec, 1, cluster.new_tags("head", "head"))
    return cluster, head


def test_attach_and_rsync_verify_the_cluster_pins_and_down_forgets_them(
        ssh_hosts, ssh_address_map, tmp_path, capfd):
    host = ssh_hosts[2]
    config = _cluster_config(tmp_path / "c.yaml", [host, ssh_hosts[1]],
                             known_hosts_file=str(tmp_path / "absent_known_hosts"))
    cluster, head = _claim_head(config)
    pins = cluster.host_keys_path()
    try:
        # attach's ssh binary checks strictly against the cluster's pin file
        argv = ssh.ssh_command_line(cluster.runner(head).target)
        assert "StrictHostKeyChecking=yes" in argv and f"UserKnownHostsFile={pins}" in argv
        assert "StrictHostKeyChecking=no" not in " ".join(argv)
        assert cluster.runner(head).shell("hostname; exit 5") == 5  # first contact pins
        assert host.hostname in capfd.readouterr().out
        assert _pins(pins)[0][:2] == [host.ip, "ssh-ed25519"]
        src = tmp_path / "f.txt"
        src.write_text("x")
        commands.rsync_up(config, str(src), "/tmp/f.txt")

        # the ssh binary itself refuses a key other than the pinned one
        good = pins.read_text()
        other = ssh_hosts[0].host_public_key().split()[1]
        pins.write_text(good.replace(good.split()[2], other))
        res = subprocess.run(ssh.ssh_command_line(cluster.runner(head).target, "true",
                                                  tty=False),
                             capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 255 and "verification failed" in res.stderr
        pins.write_text(good)

        host.new_host_key()
        _refresh_init_pid(host)
        ssh.close_all()
        for attempt in (lambda: commands.attach(config),
                        lambda: commands.rsync_up(config, str(src), "/tmp/f.txt"),
                        lambda: commands.rsync_down(config, "/tmp/f.txt", str(tmp_path / "b"))):
            with pytest.raises(HostKeyMismatchError, match=f"head:{host.ip}.*{pins}"):
                attempt()
        assert not (tmp_path / "b").exists()
    finally:
        reconcile.down(config, yes=True)
    assert not pins.exists()  # new machines may get these addresses


def test_ssh_provider_honours_the_users_known_hosts(ssh_hosts, ssh_address_map, tmp_path):
    host = ssh_hosts[1]
    known = tmp_path / "known_hosts"
    wrong = ssh_hosts[0].host_public_key()
    known.write_text(f"{host.ip} {wrong}\n")  # the user knows this host by another key
    config = _cluster_config(tmp_path / "c.yaml", [host, ssh_hosts[0]],
                             known_hosts_file=str(known))
    cluster, head = _claim_head(config)
    try:
        with pytest.raises(HostKeyMismatchError) as info:
            cluster.runner(head, echo=False).run("true")
        assert str(known) in str(info.value) and "listed in your" in str(info.value)
        assert not cluster.host_keys_path().exists()  # first contact refused: nothing pinned

        # a hashed entry (ssh-keygen -H) with the right key: verified, then pinned too
        known.write_text(f"{host.ip} {host.host_public_key()}\n")
        subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True,
                       capture_output=True, timeout=30)
        assert host.ip not in known.read_text()
        ssh.close_all()
        assert cluster.runner(head, echo=False).run("echo fine")[1] == "fine"
        assert _pins(cluster.host_keys_path())[0][2] == host.host_public_key().split()[1]
    finally:
        reconcile.down(config, yes=True)
