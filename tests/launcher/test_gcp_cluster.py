"""`strato up/exec/down` on GCP: the Compute API fake for the API, sshd hosts for machines.

The hosts play the fake's instances (``gce_hosts``): each instance is mapped to a host the
moment it is inserted, so the fake's made-up addresses are never contacted, and a host
lets in only the keys of its instance's ``ssh-keys`` metadata once the instance is
RUNNING, as GCE's guest agent does. The monitor is off (it would need a service account
on the head); ``test_gcp_spot_training.py`` runs it on the head.
"""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from strato import ssh
from strato.exceptions import LauncherError, SSHUnavailableError
from strato.launcher import commands, reconcile
from strato.launcher.state import StateDB
from strato.providers.base import TAG_KIND, TAG_NODE_TYPE, NodeTypeSpec
from strato.providers.gcp import GCPProvider
from strato.ssh import SSHTarget
from tests.harness.ssh_hosts import _keypair, stop_strato

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_strato_left", "strato_home", "monitor_off")]

ZONES = ["us-central1-a", "us-central1-b"]


def test_gcp_up_falls_back_to_the_next_zone_exec_down(gce_fake, gce_provider_config, gce_hosts,
                                                      ssh_hosts, shared_tmp_path):
    gce_fake.no_capacity(ZONES[0], spot=True)  # the spot stockout lasts: `up` must move on
    config = shared_tmp_path / "gcp.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "gcpc",
        "provider": gce_provider_config,
        "auth": {"ssh_user": "root", "ssh_private_key": ssh_hosts[0].key_path},
        "runtime_python": sys.executable,
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"},
                     "resources": {"CPU": 2}},
            "spot-gpu": {"node_config": {"machineType": "g2-standard-4"}, "zones": ZONES,
                         "resources": {"CPU": 4, "GPU": 1}, "spot": True, "min_workers": 1},
        },
        "head_node_type": "head",
    }))
    try:
        started = time.monotonic()
        result = reconcile.up(config, yes=True)
        took = time.monotonic() - started
        instances = gce_fake.instances
        assert len(instances) == 2
        head = gce_hosts.host_of(result.created[0])
        assert result.head_address == f"{head.ip}:6380"
        (spot,) = [i for i in instances.values()
                   if i.get("scheduling", {}).get("provisioningModel") == "SPOT"]
        assert spot["labels"]["strato-node-kind"] == "worker"
        assert spot["zone"].endswith(ZONES[1])  # the first zone stocked out
        failed = [r for r in gce_fake.requests_matching("POST", f"/zones/{ZONES[0]}/instances")
                  if r.path.endswith("/instances") and r.body["name"] != result.created[0]]
        assert len(failed) == 1  # one try in the full zone, then the next one
        said = [e["message"] for e in StateDB().events("gcpc")]
        assert any(f"spot in {ZONES[0]} (ZONE_RESOURCE_POOL_EXHAUSTED); trying spot in "
                   f"{ZONES[1]}" in m for m in said), said
        print(f"\nFIGURE up with the first zone stocked out: {took:.1f}s (head + 1 worker)")

        seen = shared_tmp_path / "hostnames"
        assert commands.exec_(config, f"hostname >> {seen}", node="all") == 0
        assert sorted(seen.read_text().split()) == sorted(
            gce_hosts.host_of(n).hostname for n in instances)
        assert all(n["runtime"] == "alive" for n in commands.status(config)["nodes"])
        reconcile.down(config, yes=True)
        gce_fake.settle()
        assert gce_fake.instances == {} and StateDB().get("gcpc") is None
    finally:
        if StateDB().get("gcpc") is not None:
            reconcile.down(config, yes=True)
        gce_fake.settle()
        for h in ssh_hosts:
            if h.init_pid:
                stop_strato(h)


def test_up_reports_no_capacity_anywhere(gce_fake, gce_provider_config, gce_hosts, ssh_hosts,
                                         shared_tmp_path):
    for zone in ZONES:
        gce_fake.no_capacity(zone, spot=True)
    config = shared_tmp_path / "gcp.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "gcpn",
        "provider": gce_provider_config,
        "auth": {"ssh_user": "root", "ssh_private_key": ssh_hosts[0].key_path},
        "runtime_python": sys.executable,
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"}, "resources": {"CPU": 2}},
            "spot": {"node_config": {"machineType": "n2-standard-4"}, "zones": ZONES,
                     "spot": True, "min_workers": 1},
            "spot-or-not": {"node_config": {"machineType": "n2-standard-4"}, "zones": ZONES,
                            "spot": True, "fallback_to_on_demand": True, "min_workers": 1},
        },
        "head_node_type": "head",
    }))
    try:
        with pytest.raises(LauncherError, match="no capacity for 1 spot worker"):
            reconcile.up(config, yes=True)
        workers = [i for i in gce_fake.instances.values()
                   if i["labels"]["strato-node-kind"] == "worker"]
        # only the type allowed to fall back got a node: on demand, in the first zone
        (worker,) = workers
        assert worker["labels"]["strato-node-type"] == "spot-or-not"
        assert worker["scheduling"].get("provisioningModel") != "SPOT"
        assert worker["zone"].endswith(ZONES[0])
    finally:
        reconcile.down(config, yes=True)
        gce_fake.settle()
        for h in ssh_hosts:
            if h.init_pid:
                stop_strato(h)


def test_a_vm_without_our_key_fails_ssh_fast_and_says_why(gce_fake, gce_provider_config,
                                                         gce_hosts, ssh_hosts, monkeypatch):
    """The guest agent installs only metadata keys: a VM made with another key never lets
    us in, and waiting for it must end in seconds with a clear reason, not after 300 s."""
    _, other = _keypair("someone-else")
    provider = GCPProvider({**gce_provider_config, "ssh_user": "root",
                            "ssh_public_key": other.decode()}, "nokey")
    (node,) = provider.create_nodes(NodeTypeSpec("w", {"machineType": "n2-standard-2"}), 1,
                                    {TAG_KIND: "worker", TAG_NODE_TYPE: "w"})
    monkeypatch.setenv(ssh.KEY_REFUSED_TIMEOUT_ENV, "2")
    target = SSHTarget(host=node.public_ip, user="root", key_path=ssh_hosts[0].key_path,
                       name="worker:nokey", node_id=node.id)
    started = time.monotonic()
    with pytest.raises(SSHUnavailableError, match="refuses the key") as info:
        ssh.wait_for_ssh(target, timeout=300)
    took = time.monotonic() - started
    assert 2 <= took < 15, took
    assert "ssh-keys metadata" in str(info.value)
    print(f"\nFIGURE SSH with a key the VM lacks gave up after {took:.1f}s")
    provider.terminate_nodes([node.id])
    gce_fake.settle()
