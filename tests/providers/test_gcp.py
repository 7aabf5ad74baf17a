"""GCPProvider against the in-process Compute API fake (tests/harness/gce_fake.py)."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest

from strato.exceptions import CapacityError, ConfigError, ProviderError
from strato.providers import provider_class
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    TAG_LAUNCH_HASH,
    TAG_NAME,
    TAG_NODE_TYPE,
    TAG_STATUS,
    NodeState,
    NodeTypeSpec,
)
from strato.providers.gcp import GCPProvider, accelerator_name, machine_shape

ZONE = "us-central1-a"
OTHER_ZONE = "us-central1-b"

HEAD = NodeTypeSpec(name="head", node_config={"machineType": "n1-standard-4"})
GPU_WORKER = NodeTypeSpec(
    name="gpu_worker", spot=True, zones=(ZONE, OTHER_ZONE),
    node_config={"machineType": "n1-standard-8",
                 "guestAccelerators": [{"acceleratorType": "nvidia-tesla-t4",
                                        "acceleratorCount": 2}]})


def _tags(kind: str, node_type: str) -> dict[str, str]:
    return {TAG_KIND: kind, TAG_NODE_TYPE: node_type, TAG_LAUNCH_HASH: "0123abcd",
            TAG_NAME: f"strato-demo-{kind}"}


@pytest.fixture
def provider(gce_provider_config: dict[str, Any], strato_home: Path) -> GCPProvider:
    """A provider that knows its SSH key (as after ``prepare``), so it may create VMs."""
    provider = GCPProvider(gce_provider_config, "demo")
    provider.prepare({"cluster_name": "demo", "auth": {"ssh_user": "alice"}})
    return provider


def _keyed(config: dict[str, Any]) -> dict[str, Any]:
    """A provider config that names an SSH key (no ``prepare`` needed to create VMs)."""
    return {**config, "ssh_user": "bob", "ssh_public_key": "ssh-ed25519 AAAAC3Nz bob"}


@pytest.fixture
def cluster(provider: GCPProvider, gce_fake) -> dict[str, Any]:
    """Prepared cluster with an on-demand head and two spot GPU workers."""
    facts = provider.prepare({"cluster_name": "demo", "auth": {"ssh_user": "alice"}})
    head = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    workers = provider.create_nodes(GPU_WORKER, 2, _tags("worker", "gpu_worker"))
    return {"facts": facts, "head": head[0], "workers": workers}


def test_registered_under_gcp() -> None:
    assert provider_class("gcp") is GCPProvider


def test_prepare_creates_firewall_rules_once_and_a_private_key(
        provider: GCPProvider, gce_fake, strato_home: Path) -> None:
    config = {"cluster_name": "demo", "auth": {"ssh_user": "alice"}}
    first = provider.prepare(config)
    second = provider.prepare(config)

    assert first == second
    rules = {name.split("/", 1)[1]: fw for name, fw in gce_fake.firewalls.items()}
    assert set(rules) == {"strato-demo-ssh", "strato-demo-internal"}
    ssh = rules["strato-demo-ssh"]
    assert ssh["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]
    assert ssh["sourceRanges"] == ["0.0.0.0/0"]
    assert ssh["targetTags"] == [first["network_tag"]]
    internal = rules["strato-demo-internal"]
    assert internal["sourceTags"] == internal["targetTags"] == [first["network_tag"]]
    assert internal["allowed"] == [{"IPProtocol": "all"}]
    assert len(gce_fake.requests_matching("POST", "/global/firewalls")) == 2

    key = Path(first["private_key_path"])
    assert key.is_relative_to(strato_home) and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first["ssh_public_key"].startswith("ssh-ed25519 ")


def test_prepare_uses_the_configured_private_key(provider: GCPProvider, gce_fake,
                                                 tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "id_rsa"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    facts = provider.prepare({"auth": {"ssh_user": "bob", "ssh_private_key": str(path)}})
    assert facts["private_key_path"] == str(path)
    assert facts["ssh_public_key"].startswith("ssh-rsa ")

    node = provider.create_nodes(HEAD, 1, _tags("head", "head"))[0]
    items = {i["key"]: i["value"] for i in gce_fake.instances[node.id]["metadata"]["items"]}
    assert items["ssh-keys"] == f"bob:{facts['ssh_public_key']}"


def test_create_head_and_spot_gpu_workers(cluster: dict[str, Any], gce_fake) -> None:
    head, workers = cluster["head"], cluster["workers"]
    stored = gce_fake.instances

    assert len(stored) == 3 and len(workers) == 2
    assert head.id.startswith("strato-demo-head-") and len(head.id) == len("strato-demo-head-") + 6
    assert all(w.id.startswith("strato-demo-worker-") for w in workers)
    assert head.state is NodeState.RUNNING and not head.spot
    assert all(w.spot and not w.preempted and w.zone == ZONE for w in workers)
    assert head.private_ip.startswith("10.128.") and head.public_ip.startswith("34.")
    assert head.instance_type == "n1-standard-4"
    assert head.tags[TAG_NAME] == head.id and head.tags[TAG_CLUSTER] == "demo"

    h = stored[head.id]
    assert h["labels"] == {TAG_CLUSTER: "demo", TAG_KIND: "head", TAG_NODE_TYPE: "head",
                           TAG_LAUNCH_HASH: "0123abcd"}
    assert h["machineType"].endswith(f"/zones/{ZONE}/machineTypes/n1-standard-4")
    assert h["scheduling"].get("provisioningModel") != "SPOT"
    assert h["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    assert "ubuntu" in h["disks"][0]["initializeParams"]["sourceImage"]
    assert cluster["facts"]["network_tag"] in h["tags"]["items"]
    ssh_keys = {i["key"]: i["value"] for i in h["metadata"]["items"]}["ssh-keys"]
    assert ssh_keys == f"alice:{cluster['facts']['ssh_public_key']}"

    w = stored[workers[0].id]
    assert w["labels"][TAG_NODE_TYPE] == "gpu_worker"
    assert w["scheduling"]["provisioningModel"] == "SPOT"
    assert w["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert w["scheduling"]["onHostMaintenance"] == "TERMINATE"
    acc = w["guestAccelerators"][0]
    assert acc["acceleratorType"] == ("https://www.googleapis.com/compute/v1/projects/"
                                      f"strato-test/zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4")
    assert acc["acceleratorCount"] == 2
    assert "deeplearning" in w["disks"][0]["initializeParams"]["sourceImage"]
    # Inserts answer PENDING; the provider polled with its own endpoint-aware client.
    assert len(gce_fake.requests_matching("POST", "/operations/")) >= 3


def test_spot_override_and_other_zone(provider: GCPProvider, gce_fake,
                                      gce_provider_config: dict[str, Any]) -> None:
    on_demand = provider.create_nodes(GPU_WORKER, 1, _tags("worker", "gpu_worker"),
                                      zone=OTHER_ZONE, spot=False)[0]
    stored = gce_fake.instances[on_demand.id]
    assert on_demand.zone == OTHER_ZONE and not on_demand.spot
    assert stored["scheduling"].get("provisioningModel") != "SPOT"
    assert "instanceTerminationAction" not in stored["scheduling"]
    assert f"/zones/{OTHER_ZONE}/acceleratorTypes/" in stored["guestAccelerators"][0][
        "acceleratorType"]

    # A fresh process (no memory of the zone) still finds and removes it.
    fresh = GCPProvider(gce_provider_config, "demo")
    assert [n.id for n in fresh.list_nodes()] == [on_demand.id]
    fresh.terminate_nodes([on_demand.id])
    assert gce_fake.instances == {}


def test_list_nodes_by_labels_and_cluster(cluster: dict[str, Any], gce_provider_config,
                                          strato_home: Path) -> None:
    provider = GCPProvider(gce_provider_config, "demo")
    other = GCPProvider(_keyed(gce_provider_config), "other")
    other.create_nodes(HEAD, 1, _tags("head", "head"))

    assert {n.id for n in provider.list_nodes()} == {
        cluster["head"].id, *(w.id for w in cluster["workers"])}
    workers = provider.list_nodes({TAG_KIND: "worker"})
    assert {n.id for n in workers} == {w.id for w in cluster["workers"]}
    assert all(n.node_type == "gpu_worker" and n.spot for n in workers)
    assert provider.list_nodes({TAG_NODE_TYPE: "nope"}) == []
    assert [n.id for n in provider.list_nodes({TAG_NAME: cluster["head"].id})] == [
        cluster["head"].id]
    assert len(other.list_nodes()) == 1


def test_set_tags_merges_labels(cluster: dict[str, Any], provider: GCPProvider,
                                gce_fake) -> None:
    head = cluster["head"]
    provider.set_tags(head.id, {TAG_STATUS: "up-to-date", "Owner": "Team A"})

    labels = gce_fake.instances[head.id]["labels"]
    assert labels[TAG_STATUS] == "up-to-date" and labels["owner"] == "team-a"
    assert labels[TAG_KIND] == "head"
    assert [n.id for n in provider.list_nodes({TAG_STATUS: "up-to-date"})] == [head.id]
    with pytest.raises(ProviderError):
        provider.set_tags("strato-demo-head-ffffff", {TAG_STATUS: "x"})


def test_preempted_spot_workers_are_reported(cluster: dict[str, Any], provider: GCPProvider,
                                             gce_fake, gce_provider_config) -> None:
    deleted, stopped_spec = cluster["workers"][0], {
        **GPU_WORKER.node_config, "scheduling": {"instanceTerminationAction": "STOP"}}
    stopped = provider.create_nodes(
        NodeTypeSpec("gpu_stop", stopped_spec, spot=True), 1, _tags("worker", "gpu_stop"))[0]
    gce_fake.preempt_grace_s = 0.5
    gce_fake.preempt(deleted.id)
    gce_fake.preempt(stopped.id)

    # GCE lists the preemption at once; the VMs are STOPPING through their shutdown grace
    # and are already reported preempted (not just "stopping"), from the operation.
    during = {n.id: n for n in provider.list_nodes(include_terminated=True)}
    for node in (deleted, stopped):
        assert during[node.id].state is NodeState.STOPPING and during[node.id].preempted
    assert not during[cluster["workers"][1].id].preempted
    gce_fake.settle()

    alive = {n.id for n in provider.list_nodes()}
    assert deleted.id not in alive and stopped.id not in alive
    assert cluster["workers"][1].id in alive

    everything = {n.id: n for n in provider.list_nodes(include_terminated=True)}
    gone = everything[deleted.id]
    assert gone.preempted and gone.state is NodeState.TERMINATED and gone.zone == ZONE
    assert gone.node_type == "gpu_worker"  # labels as last seen
    assert everything[stopped.id].preempted and everything[stopped.id].state is NodeState.STOPPED
    assert not everything[cluster["workers"][1].id].preempted
    by_type = provider.list_nodes({TAG_NODE_TYPE: "gpu_worker"}, include_terminated=True)
    assert {n.id for n in by_type} == {w.id for w in cluster["workers"]}

    # A fresh process has no memory of the labels but still sees the preemption, and
    # never mistakes another cluster's (even one named "demo-2") for its own.
    neighbour = GCPProvider(_keyed(gce_provider_config), "demo-2")
    theirs = neighbour.create_nodes(GPU_WORKER, 1, _tags("worker", "gpu_worker"))[0]
    gce_fake.preempt(theirs.id, grace_s=0)
    fresh = {n.id: n for n in GCPProvider(gce_provider_config, "demo").list_nodes(
        include_terminated=True)}
    assert theirs.id not in fresh
    assert fresh[deleted.id].preempted and fresh[deleted.id].tags[TAG_CLUSTER] == "demo"
    assert fresh[deleted.id].kind == "worker"
    assert [n.id for n in GCPProvider(gce_provider_config, "demo-2").list_nodes(
        include_terminated=True)] == [theirs.id]
    assert GCPProvider(gce_provider_config, "other").list_nodes(include_terminated=True) == []

    # Nodes we terminate ourselves are not reported as preempted afterwards.
    provider.terminate_nodes([deleted.id, stopped.id])
    assert {n.id for n in provider.list_nodes(include_terminated=True)} == {
        cluster["head"].id, cluster["workers"][1].id}


@pytest.mark.parametrize("reason", ["ZONE_RESOURCE_POOL_EXHAUSTED",
                                    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                                    "QUOTA_EXCEEDED"])
def test_capacity_errors_from_operations(provider: GCPProvider, gce_fake, reason: str) -> None:
    gce_fake.fail_next_insert(ZONE, reason)
    with pytest.raises(CapacityError) as info:
        provider.create_nodes(GPU_WORKER, 1, _tags("worker", "gpu_worker"))
    err = info.value
    assert (err.zone, err.code, err.node_type, err.spot) == (ZONE, reason, "gpu_worker", True)
    assert gce_fake.instances == {}
    # The other zone still works: the autoscaler's fallback.
    node = provider.create_nodes(GPU_WORKER, 1, _tags("worker", "gpu_worker"), zone=OTHER_ZONE)
    assert node[0].zone == OTHER_ZONE


def test_capacity_error_from_http_and_partial_create(provider: GCPProvider, gce_fake) -> None:
    gce_fake.fail_next_insert(ZONE, "quotaExceeded", message="Quota 'GPUS' exceeded.",
                              http_status=403)
    with pytest.raises(CapacityError) as info:
        provider.create_nodes(GPU_WORKER, 1, _tags("worker", "gpu_worker"), spot=False)
    assert info.value.code == "QUOTA_EXCEEDED" and info.value.spot is False

    # Second of three inserts is refused: two exist and stay listed, the call raises.
    gce_fake.fail_next_insert(ZONE, "ZONE_RESOURCE_POOL_EXHAUSTED", after=1)
    with pytest.raises(CapacityError, match="2 of 3 created"):
        provider.create_nodes(HEAD, 3, _tags("worker", "head"))
    assert len(provider.list_nodes()) == 2


def test_type_not_offered_in_zone_is_a_capacity_error(provider: GCPProvider, gce_fake) -> None:
    gce_fake.fail_next_insert(ZONE, "invalid", http_status=400, message=(
        "Invalid value for field 'resource.guestAccelerators[0].acceleratorType': '...'. "
        f"Accelerator type 'nvidia-tesla-t4' does not exist in zone '{ZONE}'."))
    with pytest.raises(CapacityError) as info:
        provider.create_nodes(GPU_WORKER, 1, _tags("worker", "gpu_worker"))
    assert info.value.code == "UNSUPPORTED_IN_ZONE" and info.value.zone == ZONE


def test_other_failures_are_provider_errors(provider: GCPProvider, gce_fake) -> None:
    gce_fake.fail_next_insert(ZONE, "UNSUPPORTED_OPERATION", message="not supported here")
    with pytest.raises(ProviderError) as info:
        provider.create_nodes(HEAD, 1, _tags("head", "head"))
    assert not isinstance(info.value, CapacityError)
    with pytest.raises(ConfigError, match="machineType"):
        provider.create_nodes(NodeTypeSpec("bad", {}), 1, _tags("head", "bad"))
    with pytest.raises(ConfigError, match="bad2"):
        provider.create_nodes(NodeTypeSpec("bad2", {"machineType": "n1-standard-1",
                                                    "noSuchField": 1}), 1, {})


def test_terminate_removes_everything(cluster: dict[str, Any], provider: GCPProvider,
                                      gce_fake) -> None:
    ids = [n.id for n in provider.list_nodes()]
    provider.terminate_nodes(ids + ["strato-demo-worker-000000"])
    assert provider.list_nodes() == [] and gce_fake.instances == {}
    provider.terminate_nodes(ids)  # already gone: no error


def test_state_mapping(cluster: dict[str, Any], provider: GCPProvider, gce_fake) -> None:
    head = cluster["head"].id
    for status, state, listed in [("STAGING", NodeState.PENDING, True),
                                  ("STOPPING", NodeState.STOPPING, True),
                                  ("SUSPENDED", NodeState.STOPPED, True)]:
        gce_fake.set_status(head, status)
        nodes = {n.id: n for n in provider.list_nodes({TAG_KIND: "head"})}
        assert (head in nodes) is listed
        node = {n.id: n for n in provider.list_nodes(include_terminated=True)}[head]
        assert node.state is state and not node.preempted


def test_runtime_resources(provider: GCPProvider) -> None:
    assert provider.runtime_resources(GPU_WORKER) == {
        "CPU": 8.0, "GPU": 2.0, "accelerator_type:T4": 1.0,
        "memory": float(int(8 * 3.75 * 2**30 * 0.7))}
    l4 = provider.runtime_resources(NodeTypeSpec("g2", {"machineType": "g2-standard-8"}))
    assert (l4["CPU"], l4["GPU"], l4["accelerator_type:L4"]) == (8.0, 1.0, 1.0)
    a100 = provider.runtime_resources(NodeTypeSpec("a2", {"machineType": "a2-ultragpu-2g"},
                                                   resources={"CPU": 4, "custom": 1}))
    assert (a100["CPU"], a100["GPU"], a100["custom"]) == (4, 2.0, 1)
    assert "accelerator_type:A100-80G" in a100
    assert machine_shape("e2-medium")[0] == 2 and machine_shape("n2-custom-6-20480")[:2] == (6, 20)
    assert accelerator_name("nvidia-l4") == "L4" and accelerator_name("nvidia-foo-9") == "FOO-9"


def test_the_fake_runs_operations_and_deletes_over_time(provider: GCPProvider, gce_fake) -> None:
    """As GCE: PENDING -> RUNNING -> DONE; a deleted VM is STOPPING before it is gone."""
    import time

    gce_fake.op_seconds, gce_fake.delete_seconds = 0.4, 0.4
    (node,) = provider.create_nodes(HEAD, 1, _tags("head", "head"))
    inserts = [o for o in gce_fake.operations if o["operationType"] == "insert"
               and o["targetLink"].endswith(node.id)]
    assert [o["status"] for o in inserts] == ["DONE"] and node.state is NodeState.RUNNING
    seen: list[str] = []
    gce_fake.fail_next_insert(ZONE)  # a stockout is an operation that ends in an error
    op = provider.clients.instances.insert_unary(
        project="strato-test", zone=ZONE, instance_resource=provider.clients.compute.Instance(
            name="strato-demo-x-000000", machine_type=f"zones/{ZONE}/machineTypes/n1-standard-1"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not seen or seen[-1] != "DONE"):
        status = provider.clients.zone_operations.get(
            project="strato-test", zone=ZONE, operation=op.name).status.name
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.02)
    assert seen == ["PENDING", "RUNNING", "DONE"], seen
    done = provider.clients.zone_operations.get(project="strato-test", zone=ZONE,
                                                operation=op.name)
    assert done.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"

    provider.clients.instances.delete_unary(project="strato-test", zone=ZONE, instance=node.id)
    assert gce_fake.instances[node.id]["status"] == "STOPPING"
    gce_fake.settle()
    assert node.id not in gce_fake.instances


def test_long_or_rewritten_cluster_names_never_share_a_prefix_or_label(
        gce_provider_config: dict[str, Any], gce_fake) -> None:
    """Two clusters whose names differ only past 40 characters, or only by ``_`` vs ``-``,
    would otherwise share instance name prefixes, the network tag (so firewall rules)
    and, past 63 characters, the cluster label that finds their nodes."""
    from strato.providers.gcp import label_value

    base = "team-research-experiment-with-a-very-long-name"
    names = [f"{base}-a", f"{base}-b", "a_b", "a-b", "short"]
    providers = [GCPProvider(_keyed(gce_provider_config), n) for n in names]
    prefixes = [p.prefix for p in providers]
    assert len(set(prefixes)) == len(names) and all(len(p) <= 40 for p in prefixes)
    assert providers[-1].prefix == "strato-short" == providers[-1].network_tag
    assert len({p.network_tag for p in providers}) == len(names)
    long_a, long_b = f"{'x' * 70}-a", f"{'x' * 70}-b"
    assert label_value(long_a) != label_value(long_b)
    assert all(re.fullmatch(r"[a-z0-9_-]{1,63}", label_value(v)) for v in (long_a, long_b))

    # both clusters' nodes are created (valid names and labels) and each sees only its own
    made = {}
    for p in providers[:2]:
        [made[p.cluster_name]] = p.create_nodes(HEAD, 1, _tags("head", "head"))
    for p in providers[:2]:
        assert [n.id for n in p.list_nodes()] == [made[p.cluster_name].id]
        assert made[p.cluster_name].id.startswith(p.prefix + "-head-")


def test_every_insert_carries_its_own_request_id(gce_provider_config: dict[str, Any],
                                                 gce_fake) -> None:
    """A retried insert with the same requestId is answered with the first operation by
    GCE instead of creating another VM: each instance gets one id of its own."""
    provider = GCPProvider(_keyed(gce_provider_config), "demo")
    provider.create_nodes(HEAD, 3, _tags("head", "head"))
    inserts = [r for r in gce_fake.requests if r.method == "POST" and r.path.endswith(
        "/instances")]
    ids = gce_fake.request_ids
    assert len(inserts) == 3 and len(ids) == 3 and len(set(ids)) == 3
    assert all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)
