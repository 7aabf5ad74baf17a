"""The autoscaler loop against the GCE fake: spot replacement, zone and on-demand fallback.

The GCP counterpart of ``test_autoscaler_aws.py``: ``Autoscaler.tick()`` runs with a stub
head (demand and runtime nodes from plain data) and a fake bootstrapper that only labels
the node up to date. No SSH; the fake's made-up instance addresses are never contacted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.loop import Autoscaler
from strato.launcher.cluster import Cluster
from strato.launcher.commands import _new_tags
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
                                   _new_tags(c, "head", "head"))[0]
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
    auto, _ = _autoscaler(cluster, tmp_path)
    try:
        auto.tick()  # min_workers 1 -> one spot worker in the first zone
        auto.wait_for_bootstraps(timeout=20)
        ((first, inst),) = _workers(gce_fake).items()
        assert _is_spot(inst) and _zone(inst) == ZONES[0]
        assert inst["scheduling"]["instanceTerminationAction"] == action
        assert auto.tick().is_noop

        gce_fake.preempt(first)
        assert (first in gce_fake.instances) == (action == "STOP")
        replaced_by = None
        for _ in range(MAX_TICKS):  # bounded: replaced within a tick or two
            decision = auto.tick()
            auto.wait_for_bootstraps(timeout=20)
            if decision.launch:
                replaced_by = decision
                break
        assert replaced_by is not None, _kinds(auto)
        assert auto.ticks == 3  # launch, noop, replaced on the first tick after preemption
        assert f"replace preempted node {first}" in replaced_by.launch[0].reason
        ((second, inst2),) = _workers(gce_fake).items()
        assert second != first and _is_spot(inst2)
        assert first not in gce_fake.instances  # a stopped spot VM is deleted, not kept

        events = auto.events.read()
        preempted = [e for e in events if e["kind"] == "preempted"]
        assert [e["node"] for e in preempted] == [first], [
            (e["kind"], e["message"]) for e in events]
        assert "replace preempted" in [e for e in events if e["kind"] == "launch"][-1]["message"]
        assert auto.tick().is_noop and _kinds(auto).count("preempted") == 1
    finally:
        auto.close()


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
