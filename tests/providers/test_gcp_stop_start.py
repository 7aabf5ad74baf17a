"""GCPProvider stop/start (autostop with ``down: false``) against the Compute API fake.

On-demand VMs are stopped (``TERMINATED``: disk, metadata and internal IP kept, external
IP released) and started again; spot VMs are deleted instead. The fake is as strict as
GCE: stops and starts take time, and starting a VM that is not ``TERMINATED`` fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as api_errors

from strato.exceptions import ProviderError
from strato.providers.base import TAG_KIND, TAG_NODE_TYPE, NodeState, NodeTypeSpec
from strato.providers.gcp import GCPProvider

ZONE = "us-central1-a"
HEAD = NodeTypeSpec(name="head", node_config={"machineType": "n1-standard-4"})
WORKER = NodeTypeSpec(name="wk", node_config={"machineType": "n1-standard-4"})
SPOT = NodeTypeSpec(name="spot", spot=True, node_config={"machineType": "n1-standard-4"})


def _tags(kind: str, node_type: str) -> dict[str, str]:
    return {TAG_KIND: kind, TAG_NODE_TYPE: node_type}


@pytest.fixture
def provider(gce_provider_config: dict[str, Any], strato_home: Path) -> GCPProvider:
    provider = GCPProvider(gce_provider_config, "demo")
    provider.prepare({"cluster_name": "demo", "auth": {"ssh_user": "alice"}})
    return provider


def _ssh_keys(instance: dict[str, Any]) -> str:
    return next(i["value"] for i in instance["metadata"]["items"] if i["key"] == "ssh-keys")


def test_gcp_can_stop_nodes() -> None:
    assert GCPProvider.can_stop_nodes


def test_stop_keeps_on_demand_vms_and_deletes_spot_ones(provider: GCPProvider,
                                                         gce_fake) -> None:
    gce_fake.stop_seconds = 0.5
    (head,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    (worker,) = provider.create_nodes(WORKER, 1, _tags("worker", "wk"))
    (spot,) = provider.create_nodes(SPOT, 1, _tags("worker", "spot"))
    before = gce_fake.instances

    provider.stop_nodes([worker.id, spot.id, head.id, "strato-demo-worker-000000"])
    after = gce_fake.instances
    # stop_nodes waited for its operations: stopped, not on the way
    assert {n: after[n]["status"] for n in (head.id, worker.id)} == {
        head.id: "TERMINATED", worker.id: "TERMINATED"}
    assert spot.id not in after or after[spot.id]["status"] == "STOPPING"  # being deleted
    assert [r for r in gce_fake.requests_matching("POST", f"/instances/{spot.id}/stop")] == []
    for name in (head.id, worker.id):  # the disk and metadata stay; the external IP goes
        assert _ssh_keys(after[name]) == _ssh_keys(before[name])
        nic = after[name]["networkInterfaces"][0]
        assert nic["networkIP"] == before[name]["networkInterfaces"][0]["networkIP"]
        assert "natIP" not in nic["accessConfigs"][0]

    # listed (so `down` and `status` see them), stopped and not preempted
    listed = {n.id: n for n in provider.list_nodes()}
    assert set(listed) == {head.id, worker.id}
    assert all(n.state is NodeState.STOPPED and not n.preempted and not n.is_alive
               for n in listed.values())
    assert {n.id for n in provider.list_nodes({TAG_KIND: "head"})} == {head.id}

    provider.stop_nodes([head.id])  # stopping a stopped VM again changes nothing
    assert gce_fake.instances[head.id]["status"] == "TERMINATED"
    gce_fake.settle()
    assert spot.id not in gce_fake.instances


def test_start_brings_them_back_running(provider: GCPProvider, gce_fake) -> None:
    (head,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    provider.stop_nodes([head.id])
    stopped = gce_fake.instances[head.id]

    provider.start_nodes([head.id, "strato-demo-worker-000000"])
    inst = gce_fake.instances[head.id]
    assert inst["status"] == "RUNNING" and inst["id"] == stopped["id"]
    assert _ssh_keys(inst) == _ssh_keys(stopped)
    (node,) = provider.list_nodes()
    assert node.state is NodeState.RUNNING and node.id == head.id
    assert node.private_ip == head.private_ip
    assert node.public_ip and node.public_ip != head.public_ip  # a new ephemeral IP
    starts = gce_fake.requests_matching("POST", f"/instances/{head.id}/start")
    assert len(starts) == 1

    provider.start_nodes([head.id])  # already running: left alone, no start call
    assert len(gce_fake.requests_matching("POST", f"/instances/{head.id}/start")) == 1


def test_start_waits_until_a_stopping_vm_is_stopped(provider: GCPProvider, gce_fake) -> None:
    """GCE refuses to start a VM still STOPPING: start_nodes waits for TERMINATED."""
    gce_fake.stop_seconds = 1.5
    (head,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    provider.clients.instances.stop_unary(project="strato-test", zone=ZONE, instance=head.id)
    assert gce_fake.instances[head.id]["status"] == "STOPPING"
    # the fake is strict: starting now is GCE's resourceNotReady
    with pytest.raises(api_errors.BadRequest, match="is not ready") as info:
        provider.clients.instances.start_unary(project="strato-test", zone=ZONE,
                                               instance=head.id)
    assert info.value.errors and info.value.errors[0]["reason"] == "resourceNotReady"

    provider.start_nodes([head.id])
    assert gce_fake.instances[head.id]["status"] == "RUNNING"


def test_the_fake_refuses_to_start_a_running_vm(provider: GCPProvider, gce_fake) -> None:
    (head,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    with pytest.raises(api_errors.BadRequest, match="is not ready"):
        provider.clients.instances.start_unary(project="strato-test", zone=ZONE,
                                               instance=head.id)


def test_a_start_without_capacity_says_so(provider: GCPProvider, gce_fake) -> None:
    (head,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    provider.stop_nodes([head.id])
    gce_fake.no_capacity(ZONE, spot=False)
    with pytest.raises(ProviderError, match="could not start .*ZONE_RESOURCE_POOL_EXHAUSTED"):
        provider.start_nodes([head.id])
    assert gce_fake.instances[head.id]["status"] == "TERMINATED"
    gce_fake.no_capacity(ZONE, spot=False, on=False)
    provider.start_nodes([head.id])
    assert gce_fake.instances[head.id]["status"] == "RUNNING"


def test_stopped_vms_are_deleted_by_terminate(provider: GCPProvider, gce_fake) -> None:
    (head,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    provider.stop_nodes([head.id])
    provider.terminate_nodes([n.id for n in provider.list_nodes()])
    gce_fake.settle()
    assert gce_fake.instances == {}
