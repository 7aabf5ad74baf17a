"""Autostop on GCE (the fake): the head is created with a service account and the compute
scope, so the monitor beside it can tear the cluster down with the head's own identity.

Creating a dedicated service account needs the IAM API (not served by the fake, not
called by strato): the project's default compute account unless
``provider.service_account`` names one.

With ``down: false`` autostop stops the on-demand VMs (GCE keeps them ``TERMINATED``, disks
and all) and deletes the spot ones; the next ``up`` starts the stopped VMs again. That
case runs a real cluster on the sshd hosts that play the fake's VMs, with the autoscaler
loop driven by a stub head whose ``activity()`` reports the cluster idle.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from strato.client.endpoint import gone_reason
from strato.launcher import commands, reconcile
from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.loop import Autoscaler
from strato.launcher.cluster import Cluster, open_cluster
from strato.launcher.config import load_config_from_dict
from strato.launcher.state import StateDB
from strato.providers.base import TAG_AUTOSTOPPED, NodeState
from strato.providers.gcp import COMPUTE_SCOPE
from tests.harness.ssh_hosts import stop_strato
from tests.launcher.autoscaler_stubs import StubHead

pytestmark = pytest.mark.timeout(60)


def _cluster(provider: dict[str, Any], home: Path) -> Cluster:
    config = load_config_from_dict({
        "cluster_name": "idle",
        "provider": provider,
        "autostop": 10,
        "available_node_types": {
            "head": {"node_config": {"machineType": "n1-standard-4"}},
            "wk": {"node_config": {"machineType": "n1-standard-4"}},
        },
        "head_node_type": "head",
    })
    cluster = Cluster(config, state=StateDB(home), echo=False)
    cluster.prepare()
    return cluster


def _inserted(gce_fake) -> dict[str, dict[str, Any]]:
    """Instance name -> the body of its insert request, as sent."""
    return {r.body["name"]: r.body for r in gce_fake.requests_matching("POST", "/instances")
            if isinstance(r.body, dict) and "machineType" in r.body}


@pytest.mark.parametrize("named", [None, "head@strato-test.iam.gserviceaccount.com"])
def test_head_insert_carries_a_service_account_with_compute_scope(
        gce_fake, gce_provider_config, strato_home, monkeypatch, named):
    monkeypatch.delenv("STRATO_MONITOR", raising=False)
    provider = {**gce_provider_config, "monitor": "head",
                **({"service_account": named} if named else {})}
    cluster = _cluster(provider, strato_home)
    head = cluster.provider.create_nodes(cluster.config.node_type_spec("head"), 1,
                                         cluster.new_tags("head", "head"))[0]
    worker = cluster.provider.create_nodes(cluster.config.node_type_spec("wk"), 1,
                                           cluster.new_tags("worker", "wk"))[0]
    bodies = _inserted(gce_fake)
    assert bodies[head.id]["serviceAccounts"] == [
        {"email": named or "default", "scopes": [COMPUTE_SCOPE]}]
    assert "serviceAccounts" not in bodies[worker.id]  # workers never call Compute


def test_no_service_account_when_the_monitor_is_not_on_the_head(
        gce_fake, gce_provider_config, strato_home, monkeypatch):
    monkeypatch.setenv("STRATO_MONITOR", "local")
    cluster = _cluster(gce_provider_config, strato_home)
    head = cluster.provider.create_nodes(cluster.config.node_type_spec("head"), 1,
                                         cluster.new_tags("head", "head"))[0]
    assert "serviceAccounts" not in _inserted(gce_fake)[head.id]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_strato_left", "monitor_off")
def test_autostop_down_false_stops_the_head_and_up_starts_it_again(
        gce_fake, gce_provider_config, gce_hosts, ssh_hosts, shared_tmp_path, strato_home):
    config = shared_tmp_path / "gcp.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "idle",
        "provider": gce_provider_config,
        "auth": {"ssh_user": "root", "ssh_private_key": ssh_hosts[0].key_path},
        "runtime_python": sys.executable,
        "autostop": {"idle_minutes": 1, "down": False},
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"},
                     "resources": {"CPU": 2}},
            "wk": {"node_config": {"machineType": "n2-standard-2"}, "resources": {"CPU": 2},
                   "min_workers": 1},
            "spot": {"node_config": {"machineType": "n2-standard-2"}, "resources": {"CPU": 2},
                     "spot": True, "min_workers": 1},
        },
        "head_node_type": "head",
    }))
    try:
        first = reconcile.up(config, yes=True)
        cluster = open_cluster(config, echo=False)
        nodes = {n.node_type: n for n in cluster.nodes()}
        assert set(nodes) == {"head", "wk", "spot"}
        head_host = gce_hosts.host_of(nodes["head"].id)

        # the monitor's loop finds the cluster idle for its minute: it stops the cluster
        stub = StubHead(cluster)
        stub.started.update(n.id for n in nodes.values())
        clock = [1000.0]
        auto = Autoscaler(cluster, runtime=stub, bootstrapper=stub.bootstrap,
                          events=EventLog(shared_tmp_path / "events.jsonl"),
                          head_address=first.head_address, clock=lambda: clock[0])
        auto.tick()
        stub.idle_seconds = 120.0
        clock[0] += 120
        auto.tick()
        assert auto.stop.is_set() and auto.autostopped[-1] == nodes["head"].id  # head last
        (event,) = [e for e in auto.events.read() if e["kind"] == "autostop"]
        assert "stopping 3 node(s)" in event["message"] and event["stopped"] is True
        gce_fake.settle()

        # nothing on-demand deleted: head and worker are stopped VMs; the spot VM is gone
        instances = gce_fake.instances
        assert {n: i["status"] for n, i in instances.items()} == {
            nodes["head"].id: "TERMINATED", nodes["wk"].id: "TERMINATED"}
        assert not gce_fake.requests_matching("DELETE", f"/instances/{nodes['head'].id}")
        assert head_host.init_pid == 0  # the machine itself is off
        status = commands.status(config)
        states = {n["id"]: n["state"] for n in status["nodes"]}
        assert states == {nodes["head"].id: "stopped", nodes["wk"].id: "stopped"}
        assert status["runtime"]["reachable"] is False
        (head,) = [n for n in cluster.machines(include_terminated=True) if n.kind == "head"]
        assert head.state is NodeState.STOPPED and head.tags[TAG_AUTOSTOPPED]
        assert "(idle; stopped)" in gone_reason(open_cluster(config, echo=False))

        # the next `up` starts the stopped VMs (on their own disks) and replaces the spot one
        again = reconcile.up(config, yes=True)
        assert len(again.created) == 1 and again.created[0] not in instances
        assert gce_fake.instances[nodes["head"].id]["status"] == "RUNNING"
        assert gce_hosts.host_of(nodes["head"].id) is head_host
        assert again.head_address == first.head_address
        said = [e["message"] for e in StateDB().events("idle")]
        assert any(m.startswith("started (was stopped)") for m in said), said
        status = commands.status(config)
        assert {n["state"] for n in status["nodes"]} == {"running"}
        assert [n["runtime"] for n in status["nodes"]] == ["alive"] * 3
        seen = shared_tmp_path / "hostnames"
        assert commands.exec_(config, f"hostname >> {seen}", node="all") == 0
        assert len(seen.read_text().split()) == 3

        reconcile.down(config, yes=True)
        gce_fake.settle()
        assert gce_fake.instances == {}
    finally:
        if StateDB().get("idle") is not None:
            reconcile.down(config, yes=True)
        gce_fake.settle()
        for h in ssh_hosts:
            if h.init_pid:
                stop_strato(h)
