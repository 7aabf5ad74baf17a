"""Ray's full example YAMLs (ours, equivalent: tests/launcher/ray_examples.py) come up
unchanged but for where to log in and which Python to run, against moto and the GCE fake
with the monitor on the head (a test sshd host): the worker type that asks for spot in
the cloud's own words is launched as spot, its node agent watches the spot notice, and
when the cloud takes it back the head's autoscaler records the preemption and replaces it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from strato.launcher import commands, reconcile
from strato.launcher.state import StateDB
from tests.harness.moto_server import (
    interrupt_spot_instance,
    map_instances_to_hosts,
    monitor_env_for,
)
from tests.harness.ssh_hosts import stop_strato, strato_processes
from tests.launcher.ray_examples import AWS_EXAMPLE, GCP_EXAMPLE

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_strato_left")]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _as_user_would(example: str, path: Path, **changes) -> Path:
    """The example with only login, Python and tick changed (as a user points it at a
    test bed); everything Ray-specific stays."""
    data = yaml.safe_load(example)
    data.update(changes)
    data["runtime_python"] = sys.executable
    data["autoscaler"] = {"tick_seconds": 0.5}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _preempted_event(config: Path, node_id: str):
    events = commands.status(config)["autoscaler"]["events"]
    return next((e for e in events if e["kind"] == "preempted" and e["node"] == node_id), None)


def _spot_notice_on(host, cloud: str) -> bool:
    """Whether a node agent on ``host`` watches ``cloud``'s spot notice (full command
    lines: ``ps -ww``)."""
    if not host.init_pid or not strato_processes(host):
        return False
    res = host.run_local("ps -eww -o args", timeout=15)
    return any("strato.runtime.node" in line and f"--spot-notice {cloud}" in line
               for line in res.stdout.splitlines())


# ---------------------------------------------------------------- AWS (moto)
def test_rays_aws_example_spot_workers_on_moto(moto_endpoint, moto_bridge_server, ssh_hosts,
                                               ssh_address_map, shared_tmp_path, tmp_path,
                                               monkeypatch):
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATO_MONITOR", raising=False)  # the default: on the head
    monkeypatch.setenv("STRATO_MONITOR_ENV", json.dumps(monitor_env_for(moto_bridge_server)))
    map_instances_to_hosts(monkeypatch, ssh_address_map,
                           {"head": ssh_hosts[:1], "worker": ssh_hosts[1:]})
    ec2 = boto3.client("ec2", region_name="us-east-1")
    config = _as_user_would(AWS_EXAMPLE, shared_tmp_path / "aws.yaml",
                            auth={"ssh_user": "root",
                                  "ssh_private_key": ssh_hosts[0].key_path})

    def workers() -> dict[str, dict]:
        found = {}
        for r in ec2.describe_instances(Filters=[
                {"Name": "tag:strato-node-kind", "Values": ["worker"]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]}]
                                        )["Reservations"]:
            found.update({i["InstanceId"]: i for i in r["Instances"]})
        return found

    try:
        reconcile.up(config, yes=True)
        ((first, inst),) = workers().items()
        assert inst.get("InstanceLifecycle") == "spot"
        status = commands.status(config)
        assert {n["id"]: n["spot"] for n in status["nodes"]}[first] is True
        assert _spot_notice_on(ssh_hosts[1], "aws")  # the worker's agent watches the notice

        interrupt_spot_instance(first)
        _wait(lambda: _preempted_event(config, first), 60, "the preemption to be recorded")
        replacement = _wait(lambda: next((i for i in workers() if i != first), None), 60,
                            "a replacement spot worker")
        assert workers()[replacement].get("InstanceLifecycle") == "spot"
        _wait(lambda: _spot_notice_on(ssh_hosts[2], "aws"), 60,
              "the replacement's runtime, watching the notice")
        reconcile.down(config, yes=True)
        assert StateDB().get("rayaws") is None
    finally:
        if StateDB().get("rayaws") is not None:
            reconcile.down(config, yes=True)
        for host in ssh_hosts:  # terminating a moto instance stops nothing on the host
            stop_strato(host)


# ---------------------------------------------------------------- GCP (the GCE fake)
def test_rays_gcp_example_preemptible_workers_on_the_gce_fake(gce_host_pool, gce_bridge_fake,
                                                              ssh_hosts, shared_tmp_path,
                                                              tmp_path, monkeypatch):
    fake = gce_bridge_fake
    fake.preempt_grace_s = 2.0
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATO_MONITOR", raising=False)  # GCP default: on the head
    data = yaml.safe_load(GCP_EXAMPLE)
    provider = {**data["provider"], "api_endpoint": fake.endpoint}
    config = _as_user_would(GCP_EXAMPLE, shared_tmp_path / "gcp.yaml", provider=provider,
                            auth={"ssh_user": "root"})

    def workers() -> dict[str, dict]:
        return {n: i for n, i in fake.instances.items()
                if i["labels"]["strato-node-kind"] == "worker"}

    try:
        reconcile.up(config, yes=True)
        ((first, inst),) = workers().items()
        scheduling = inst["scheduling"]
        assert scheduling.get("provisioningModel") == "SPOT" and scheduling["preemptible"]
        assert {n["id"]: n["spot"] for n in commands.status(config)["nodes"]}[first] is True
        _wait(lambda: any(h.init_pid and _spot_notice_on(h, "gcp") for h in ssh_hosts), 30,
              "the worker's agent to watch the preemption notice")

        fake.preempt(first)
        _wait(lambda: _preempted_event(config, first), 60, "the preemption to be recorded")
        replacement = _wait(lambda: next((n for n in workers() if n != first), None), 60,
                            "a replacement preemptible worker")
        assert workers()[replacement]["scheduling"].get("provisioningModel") == "SPOT"
        events = commands.status(config)["autoscaler"]["events"]
        _wait(lambda: any(e["kind"] == "ready" and e["node"] == replacement for e in
                          commands.status(config)["autoscaler"]["events"]), 60,
              f"the replacement to be ready: {[(e['kind'], e['node']) for e in events]}")
        reconcile.down(config, yes=True)
        fake.settle()
        assert fake.instances == {} and StateDB().get("raygcp") is None
    finally:
        if StateDB().get("raygcp") is not None:
            reconcile.down(config, yes=True)
        fake.settle()
