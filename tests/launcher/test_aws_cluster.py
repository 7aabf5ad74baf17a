"""`strato up/exec/down` on AWS: moto for the API, real sshd hosts for the machines.

moto's instances carry made-up addresses that must never be contacted: every instance is
mapped to a test host in the strict address map the moment it is created (before the
launcher connects), and the launcher sends SSH *and* runtime traffic through that map.
The monitor would need AWS credentials on the head, so it is off here (STRATO_MONITOR).
"""

from __future__ import annotations

import sys
from pathlib import Path

import boto3
import pytest
import yaml

from strato.launcher import commands, reconcile
from strato.launcher.state import StateDB
from strato.providers.aws import AWSProvider
from tests.harness.ssh_hosts import stop_strato

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_strato_left", "strato_home", "monitor_off")]


@pytest.fixture
def hosts_for_instances(ssh_hosts, ssh_address_map, monkeypatch):
    """Map each new instance to the next test host: the head to h2, workers to h3, h4."""
    free = {"head": [ssh_hosts[0]], "worker": list(ssh_hosts[1:])}
    original = AWSProvider.create_nodes

    def create_nodes(self, spec, count, tags, **kw):
        nodes = original(self, spec, count, tags, **kw)
        for node in nodes:
            host = free[tags["strato-node-kind"]].pop(0)
            ssh_address_map.add(node.id, host)
            free[tags["strato-node-kind"]].append(host)  # a replacement reuses the host
        return nodes

    monkeypatch.setattr(AWSProvider, "create_nodes", create_nodes)
    return ssh_hosts


def _config(path: Path, key_path: str, instance_type: str = "t3.medium") -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": "awsc",
        "provider": {"type": "aws", "region": "us-east-1", "availability_zone": "us-east-1a"},
        "auth": {"ssh_user": "root", "ssh_private_key": key_path},
        "runtime_python": sys.executable,
        "available_node_types": {
            "head": {"node_config": {"InstanceType": instance_type}, "max_workers": 0},
            "gpu_spot": {"node_config": {"InstanceType": "g5.xlarge"}, "spot": True,
                         "min_workers": 1, "max_workers": 2},
        },
        "head_node_type": "head",
    }))
    return path


def _running(ec2) -> list[dict]:
    out = []
    for r in ec2.describe_instances(Filters=[
            {"Name": "tag:strato-cluster", "Values": ["awsc"]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]:
        out += r["Instances"]
    return out


def test_aws_up_exec_replace_down(moto_endpoint, hosts_for_instances, shared_tmp_path):
    hosts = hosts_for_instances
    ec2 = boto3.client("ec2", region_name="us-east-1")
    config = _config(shared_tmp_path / "aws.yaml", hosts[0].key_path)
    try:
        first = reconcile.up(config, yes=True)
        assert first.head_address == f"{hosts[0].ip}:6380"
        instances = _running(ec2)
        kinds = {i["InstanceId"]: {t["Key"]: t["Value"] for t in i["Tags"]}["strato-node-kind"]
                 for i in instances}
        assert sorted(kinds.values()) == ["head", "worker"]
        worker = next(i for i in instances if kinds[i["InstanceId"]] == "worker")
        assert worker.get("InstanceLifecycle") == "spot"
        assert reconcile.up(config, yes=True).created == []

        seen = shared_tmp_path / "hostnames"
        assert commands.exec_(config, f"hostname >> {seen}", node="all") == 0
        assert sorted(seen.read_text().split()) == sorted(h.hostname for h in hosts[:2])
        info = commands.status(config)
        gpu = next(n for n in info["nodes"] if n["kind"] == "worker")
        assert gpu["spot"] and gpu["runtime"] == "alive" and gpu["resources"]["GPU"] == 1

        # a changed node_config replaces the head; the worker rejoins the new head
        _config(config, hosts[0].key_path, instance_type="t3.large")
        replaced = reconcile.up(config, yes=True)
        assert len(replaced.created) == 1 and len(replaced.terminated) == 1
        assert all(n["runtime"] == "alive" for n in commands.status(config)["nodes"])

        reconcile.down(config, yes=True)
        assert _running(ec2) == [] and StateDB().get("awsc") is None
    finally:
        if StateDB().get("awsc") is not None:
            reconcile.down(config, yes=True)
        for h in hosts[:2]:  # terminating a moto instance stops nothing on the host
            stop_strato(h)
