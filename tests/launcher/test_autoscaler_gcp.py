"""The autoscaler loop against the GCE fake: spot replacement, zone and on-demand fallback.

The GCP counterpart of ``test_autoscaler_aws.py``: ``Autoscaler.tick()`` runs with a stub
head (demand and runtime nodes from plain data) and a fake bootstrapper that only labels
the node up to date. No SSH; the fake's made-up instance addresses are never contacted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from strato.exceptions import ProviderError
from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.loop import Autoscaler
from strato.launcher.cluster import Cluster
from strato.launcher.config import load_config_from_dict
from strato.launcher.state import StateDB
from strato.providers.base import TAG_STATUS, NodeStatus
from strato.providers.gcp import GCPProvider
from tests.launcher.autoscaler_stubs import StubHead

pytestmark = pytest.mark.timeout(60)

ZONES = ["us-central1-a", "us-central1-b"]
MAX_TICKS = 5


def _make_cluster(provider_config: dict[str, Any], tmp_path, spot_config: dict[str, Any]
                  ) -> Cluster:
    config = load_config_from_dict({
        "cluster_name": "asg",
        "provider": provider_config,
        "autoscaler": {"tick_seconds": 0.1},
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"}, "zones": ZONES[:1]},
            "spot": {"node_config": spot_config, "spot": True,
                     "fallback_to_on_demand": True, "zones": ZONES,
                     "min_workers": 1, "max_workers": 3},
        },
        "head_node_type": "head",
    })
    c = Cluster(config, state=StateDB(tmp_path / "home"), echo=False)
    assert isinstance(c.provider, GCPProvider)
    c.prepare()
    c.token = "test-token"
    head = c.provider.create_nodes(config.node_type_spec("head"), 1,
                                   c.new_tags("head", "head"))[0]
    c.provider.set_tags(head.id, {TAG_STATUS: NodeStatus.UP_TO_DATE.value})
    return c


@pytest.fixture
def make_cluster(gce_provider_config, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STRATO_MONITOR", "off")

    def make(spot_config: dict[str, Any] | None = None) -> Cluster:
        return _make_cluster(gce_provider_config, tmp_path,
                             spot_config or {"machineType": "n2-standard-4"})
    return make


@pytest.fixture
def cluster(make_cluster) -> Cluster:
    return make_cluster()


def _autoscaler(cluster: Cluster, tmp_path, **kw) -> tuple[Autoscaler, StubHead]:
    stub = StubHead(cluster)
    kw.setdefault("bootstrapper", stub.bootstrap)
    auto = Autoscaler(cluster, runtime=stub, events=EventLog(tmp_path / "events.jsonl"),
                      head_address="10.0.0.1:6380", **kw)
    stub.started.add(cluster.require_head().id)
    return auto, stub


def _workers(fake) -> dict[str, dict]:
    """The fake's live (RUNNING) worker instances by name."""
    return {name: inst for name, inst in fake.instances.items()
            if inst["labels"].get("strato-node-kind") == "worker"
            and inst["status"] == "RUNNING"}


def _is_spot(inst: Mapping[str, Any]) -> bool:
    return inst.get("scheduling", {}).get("provisioningModel") == "SPOT"


def _zone(inst: Mapping[str, Any]) -> str:
    return inst["zone"].rsplit("/", 1)[-1]


def _kinds(auto: Autoscaler) -> list[str]:
    return [e["kind"] for e in auto.events.read()]


@pytest.mark.parametrize("action", ["DELETE", "STOP"])
def test_spot_worker_preempted_is_replaced(make_cluster, gce_fake, tmp_path, action):
    cluster = make_cluster({"machineType": "n2-standard-4",
                            "scheduling": {"instanceTerminationAction": action}})
    auto, stub = _autoscaler(cluster, tmp_path)
    try:
        auto.tick()  # min_workers 1 -> one spot worker in the first zone
        auto.wait_for_bootstraps(timeout=20)
        ((first, inst),) = _workers(gce_fake).items()
        assert _is_spot(inst) and _zone(inst) == ZONES[0]
        assert inst["scheduling"]["instanceTerminationAction"] == action
        assert auto.tick().is_noop

        gce_fake.preempt_grace_s = 3.0
        gce_fake.preempt(first)
        assert gce_fake.instances[first]["status"] == "STOPPING"  # its shutdown grace
        decision = auto.tick()  # the operation is listed at once: replace now
        auto.wait_for_bootstraps(timeout=20)
        assert decision.launch and f"replace preempted node {first}" in \
            decision.launch[0].reason
        assert auto.ticks == 3  # launch, noop, replaced on the first tick after preemption
        # ... and its grace is not cut short: drained at the head, never deleted by strato
        assert [d.node_id for d in decision.drain] == [first] and not decision.terminate
        assert stub.drained and gce_fake.instances[first]["status"] == "STOPPING"
        assert not gce_fake.requests_matching("DELETE", f"/instances/{first}")
        ((second, inst2),) = _workers(gce_fake).items()
        assert second != first and _is_spot(inst2)

        for _ in range(MAX_TICKS):  # bounded: nothing more happens during the grace
            assert not auto.tick().launch
        assert gce_fake.wait_for(lambda: gce_fake.instances.get(first, {}).get(
            "status", "gone") != "STOPPING", timeout=10)
        auto.tick()  # after the grace: a STOPped spot VM is deleted, not kept
        gce_fake.settle()
        assert first not in gce_fake.instances

        events = auto.events.read()
        preempted = [e for e in events if e["kind"] == "preempted"]
        assert [e["node"] for e in preempted] == [first], [
            (e["kind"], e["message"]) for e in events]
        assert "shutdown grace" in preempted[0]["message"]
        assert "replace preempted" in [e for e in events if e["kind"] == "launch"][-1]["message"]
        assert auto.tick().is_noop and _kinds(auto).count("preempted") == 1
        assert len(_workers(gce_fake)) == 1
    finally:
        auto.close()


def test_monitor_launched_workers_carry_the_ssh_key(make_cluster, gce_fake, tmp_path,
                                                    monkeypatch):
    """The monitor never runs prepare(): it must still put the cluster's key on every VM
    (GCE lets in only keys from the instance's or the project's ssh-keys metadata)."""
    from strato.launcher.monitor import start_monitor

    up_side = make_cluster()
    spec: dict[str, Any] = {}

    class Capture:  # what start_monitor would write: stop before running anything
        def put(self, local, remote):
            spec.update(json.loads(Path(local).read_text()))
            raise _Stop

    class _Stop(Exception):
        pass

    import strato.launcher.monitor as monitor

    monkeypatch.setenv("STRATO_MONITOR", "local")
    monkeypatch.setattr(monitor, "monitor_runner",
                        lambda cluster, head, **kw: (Capture(), str(tmp_path / "m")))
    with pytest.raises(_Stop):
        start_monitor(up_side, up_side.require_head(), "10.0.0.1:6380", {"spot": 1})
    monkeypatch.setenv("STRATO_MONITOR", "off")
    assert spec["facts"]["ssh_public_key"]

    # The monitor process: a fresh Cluster from that spec, no prepare()
    monitor_side = Cluster(load_config_from_dict(spec["config"]), overrides=spec,
                           state=StateDB(tmp_path / "home"), echo=False)
    monitor_side.token = "test-token"
    auto, _ = _autoscaler(monitor_side, tmp_path)
    try:
        auto.tick()
        auto.wait_for_bootstraps(timeout=20)
        ((_, worker),) = _workers(gce_fake).items()
        keys = {i["key"]: i["value"] for i in worker["metadata"]["items"]}["ssh-keys"]
        assert keys == f"{spec['facts']['ssh_user']}:{spec['facts']['ssh_public_key']}"
    finally:
        auto.close()

    # Without the facts a provider refuses to create VMs nobody could log into.
    bare = Cluster(load_config_from_dict(spec["config"]), state=StateDB(tmp_path / "home"),
                   echo=False)
    with pytest.raises(ProviderError, match="no SSH key"):
        bare.provider.create_nodes(bare.config.node_type_spec("spot"), 1,
                                   bare.new_tags("worker", "spot"))
    assert len(_workers(gce_fake)) == 1


def test_capacity_error_moves_to_the_next_zone_in_the_same_tick(cluster, gce_fake, tmp_path):
    auto, _ = _autoscaler(cluster, tmp_path)
    try:
        gce_fake.fail_next_insert(ZONES[0], reason="ZONE_RESOURCE_POOL_EXHAUSTED")
        auto.tick()
        auto.wait_for_bootstraps(timeout=20)
        ((_, worker),) = _workers(gce_fake).items()
        assert _zone(worker) == ZONES[1] and _is_spot(worker)
        events = auto.events.read()
        assert [e["kind"] for e in events][:2] == ["capacity-error", "launch"]
        assert events[0]["zone"] == ZONES[0]
        assert events[0]["code"] == "ZONE_RESOURCE_POOL_EXHAUSTED"
        assert events[0]["spot"] is True and events[1]["spot"] is True
        assert events[1]["tick"] == events[0]["tick"] == 1
    finally:
        auto.close()


def test_no_spot_capacity_anywhere_falls_back_to_on_demand(cluster, gce_fake, tmp_path):
    auto, stub = _autoscaler(cluster, tmp_path)
    try:
        for zone in ZONES:  # the spot insert in each zone fails; on-demand then succeeds
            gce_fake.fail_next_insert(zone, reason="ZONE_RESOURCE_POOL_EXHAUSTED")
        auto.tick()
        auto.wait_for_bootstraps(timeout=20)
        ((_, worker),) = _workers(gce_fake).items()
        assert not _is_spot(worker)
        assert "instanceTerminationAction" not in worker.get("scheduling", {})
        events = auto.events.read()
        assert [e["kind"] for e in events][:4] == ["capacity-error", "capacity-error",
                                                  "fallback", "launch"]
        assert [e["zone"] for e in events[:2]] == ZONES
        first_error, launch = events[0], events[3]
        assert launch["spot"] is False and "fallback to on-demand" in launch["message"]
        ticks = launch["tick"] - first_error["tick"] + 1
        print(f"\nFIGURE ticks from capacity error to fallback launch: {ticks}")
        assert ticks == 1 and auto.ticks == 1

        # spot is backed off: more demand launches on demand directly, no spot retry storm
        inserts = len(gce_fake.requests_matching("POST", "/instances"))
        stub.demand = [{"shape": {"CPU": 4}, "count": 2, "infeasible": False}]
        auto.tick()
        auto.wait_for_bootstraps(timeout=20)
        assert _kinds(auto).count("capacity-error") == 2
        workers = _workers(gce_fake).values()
        assert len(workers) >= 2 and not any(_is_spot(w) for w in workers)
        new_inserts = [r for r in gce_fake.requests_matching("POST", "/instances")[inserts:]
                       if r.path.endswith("/instances")]
        assert new_inserts and not any(_is_spot(r.body) for r in new_inserts)
    finally:
        auto.close()
