"""`strato up/exec/down` on GCP: the Compute API fake for the API, sshd hosts for machines.

As on AWS, every instance is mapped to a test host the moment it is created, so the
fake's made-up addresses are never contacted; the monitor is off (it would need a
service account on the head).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from strato.launcher import commands
from strato.launcher.state import StateDB
from strato.providers.gcp import GCPProvider
from tests.launcher.cluster_helpers import stop_strato, strato_processes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def strato_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STRATO_MONITOR", "off")
    return tmp_path / "home"


def test_gcp_up_exec_down(gce_fake, gce_provider_config, ssh_hosts, ssh_address_map,
                          shared_tmp_path, monkeypatch):
    hosts = iter(ssh_hosts[:2])
    original = GCPProvider.create_nodes

    def create_nodes(self, spec, count, tags, **kw):
        nodes = original(self, spec, count, tags, **kw)
        for node in nodes:
            ssh_address_map.add(node.id, next(hosts))
        return nodes

    monkeypatch.setattr(GCPProvider, "create_nodes", create_nodes)
    config = shared_tmp_path / "gcp.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "gcpc",
        "provider": gce_provider_config,
        "auth": {"ssh_user": "root", "ssh_private_key": ssh_hosts[0].key_path},
        "runtime_python": sys.executable,
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"},
                     "resources": {"CPU": 2}},
            "spot-gpu": {"node_config": {"machineType": "g2-standard-4"},
                         "resources": {"CPU": 4, "GPU": 1}, "spot": True, "min_workers": 1},
        },
        "head_node_type": "head",
    }))
    try:
        result = commands.up(config, yes=True)
        assert result.head_address == f"{ssh_hosts[0].ip}:6380"
        instances = gce_fake.instances
        assert len(instances) == 2
        spot = [i for i in instances.values()
                if i.get("scheduling", {}).get("provisioningModel") == "SPOT"]
        assert len(spot) == 1 and spot[0]["labels"]["strato-node-kind"] == "worker"
        seen = shared_tmp_path / "hostnames"
        assert commands.exec_(config, f"hostname >> {seen}", node="all") == 0
        assert sorted(seen.read_text().split()) == sorted(h.hostname for h in ssh_hosts[:2])
        assert all(n["runtime"] == "alive" for n in commands.status(config)["nodes"])
        commands.down(config, yes=True)
        assert gce_fake.instances == {} and StateDB().get("gcpc") is None
    finally:
        if StateDB().get("gcpc") is not None:
            commands.down(config, yes=True)
        for h in ssh_hosts[:2]:
            stop_strato(h)
            assert not strato_processes(h), h.name
