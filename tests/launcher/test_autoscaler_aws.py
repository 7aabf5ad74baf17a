"""The autoscaler loop against moto: launch, spot replacement, zone and on-demand fallback.

No SSH and no runtime: ``Autoscaler.tick()`` runs with a stub head (demand and runtime
nodes from plain data) and a fake bootstrapper that only tags the node up to date.
moto's instance IPs are never contacted.
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.loop import Autoscaler
from strato.launcher.bootstrap import start_args
from strato.launcher.cluster import Cluster
from strato.launcher.config import load_config_from_dict
from strato.launcher.state import StateDB
from strato.providers.base import TAG_STATUS, Node, NodeStatus
from tests.harness.moto_server import inject_capacity_error, interrupt_spot_instance
from tests.launcher.autoscaler_stubs import StubHead

pytestmark = pytest.mark.timeout(60)

ZONES = ["us-east-1a", "us-east-1b"]


@pytest.fixture
def cluster(moto_endpoint, tmp_path, monkeypatch) -> Cluster:
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    config = load_config_from_dict({
        "cluster_name": "as",
        "provider": {"type": "aws", "region": "us-east-1"},
        "autoscaler": {"tick_seconds": 0.1},
        "available_node_types": {
            "head": {"node_config": {"InstanceType": "t3.medium"}, "zones": ZONES[:1]},
            "spot": {"node_config": {"InstanceType": "m5.large"}, "spot": True,
                     "fallback_to_on_demand": True, "zones": ZONES,
                     "min_workers": 1, "max_workers": 3},
        },
        "head_node_type": "head",
    })
    c = Cluster(config, state=StateDB(tmp_path / "home"), echo=False)
    c.prepare()
    c.token = "test-token"
    head = c.provider.create_nodes(config.node_type_spec("head"), 1,
                                   c.new_tags("head", "head"))[0]
    c.provider.set_tags(head.id, {TAG_STATUS: NodeStatus.UP_TO_DATE.value})
    return c


def _autoscaler(cluster: Cluster, tmp_path, **kw) -> tuple[Autoscaler, StubHead]:
    stub = StubHead(cluster)
    kw.setdefault("bootstrapper", stub.bootstrap)
    auto = Autoscaler(cluster, runtime=stub, events=EventLog(tmp_path / "events.jsonl"),
                      head_address="10.0.0.1:6380", **kw)
    stub.started.add(cluster.require_head().id)
    return auto, stub


def _workers(ec2) -> list[dict]:
    out = []
    for r in ec2.describe_instances(Filters=[
            {"Name": "tag:strato-node-kind", "Values": ["worker"]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]:
        out += r["Instances"]
    return out


def _kinds(auto: Autoscaler) -> list[str]:
    return [e["kind"] for e in auto.events.read()]


def test_spot_worker_preempted_is_replaced(cluster, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    auto, stub = _autoscaler(cluster, tmp_path)
    auto.tick()  # min_workers 1 -> one spot worker in the first zone
    auto.wait_for_bootstraps()
    (first,) = _workers(ec2)
    assert first.get("InstanceLifecycle") == "spot"
    assert first["Placement"]["AvailabilityZone"] == ZONES[0]
    spot_node = cluster.provider.list_nodes({"strato-node-kind": "worker"})[0]
    args = start_args(cluster, spot_node, "10.0.0.1:6380")  # spot on aws: watch the notice
    assert args[args.index("--spot-notice") + 1] == "aws"
    assert auto.tick().is_noop

    interrupt_spot_instance(first["InstanceId"])
    decision = auto.tick()
    auto.wait_for_bootstraps()
    (second,) = _workers(ec2)
    assert second["InstanceId"] != first["InstanceId"]
    assert second.get("InstanceLifecycle") == "spot"
    assert f"replace preempted node {first['InstanceId']}" in decision.launch[0].reason
    events = auto.events.read()
    preempted = [e for e in events if e["kind"] == "preempted"]
    assert [e["node"] for e in preempted] == [first["InstanceId"]]
    assert "replace preempted" in [e for e in events if e["kind"] == "launch"][-1]["message"]
    assert auto.tick().is_noop and _kinds(auto).count("preempted") == 1


def test_capacity_error_moves_to_the_next_zone_in_the_same_tick(cluster, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    auto, _ = _autoscaler(cluster, tmp_path)
    undo = inject_capacity_error(cluster.provider.ec2, zones=ZONES[:1])
    try:
        auto.tick()
    finally:
        undo()
    (worker,) = _workers(ec2)
    assert worker["Placement"]["AvailabilityZone"] == ZONES[1]
    assert worker.get("InstanceLifecycle") == "spot"
    events = auto.events.read()
    assert [e["kind"] for e in events][:2] == ["capacity-error", "launch"]
    assert events[0]["zone"] == ZONES[0] and events[0]["code"] == "InsufficientInstanceCapacity"
    assert events[1]["tick"] == events[0]["tick"] == 1


def _inject_spot_capacity_error(ec2_client) -> None:
    """InsufficientInstanceCapacity for every spot request, in every zone."""
    def handler(params: dict[str, Any], **_: Any) -> None:
        if params.get("InstanceMarketOptions"):
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity",
                                         "Message": "no spot capacity (injected)"}},
                              "RunInstances")

    ec2_client.meta.events.register("before-parameter-build.ec2.RunInstances", handler,
                                    unique_id="strato-test-spot-capacity")


def test_no_spot_capacity_anywhere_falls_back_to_on_demand(cluster, tmp_path):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    auto, stub = _autoscaler(cluster, tmp_path)
    _inject_spot_capacity_error(cluster.provider.ec2)
    auto.tick()
    auto.wait_for_bootstraps()
    (worker,) = _workers(ec2)
    assert worker.get("InstanceLifecycle") != "spot"
    events = auto.events.read()
    assert [e["kind"] for e in events][:4] == ["capacity-error", "capacity-error", "fallback",
                                              "launch"]
    first_error = events[0]
    launch = events[3]
    assert launch["spot"] is False and "fallback to on-demand" in launch["message"]
    ticks = launch["tick"] - first_error["tick"] + 1
    print(f"\nFIGURE ticks from capacity error to fallback launch: {ticks}")
    assert ticks == 1

    # backed off: more demand launches on demand directly, no retry storm on spot
    stub.demand = [{"shape": {"CPU": 2}, "count": 2, "infeasible": False}]
    auto.tick()
    assert _kinds(auto).count("capacity-error") == 2
    assert sum(w.get("InstanceLifecycle") != "spot" for w in _workers(ec2)) == 2


def test_failed_setup_is_retried_with_backoff_then_replaced(cluster, tmp_path):
    now = [1000.0]
    attempts: list[str] = []

    def failing(node: Node, setup: bool) -> None:
        attempts.append(node.id)
        raise RuntimeError("setup command exited 1")

    auto, _ = _autoscaler(cluster, tmp_path, bootstrapper=failing, clock=lambda: now[0])
    auto.tick()
    auto.wait_for_bootstraps()
    (bad,) = set(attempts)
    auto.tick()  # the retry waits for its backoff: nothing new
    auto.wait_for_bootstraps()
    assert attempts == [bad]
    for step in (11.0, 21.0):  # 10 s, then 20 s
        now[0] += step
        auto.tick()
        auto.wait_for_bootstraps()
    assert attempts == [bad] * 3
    now[0] += 41.0
    decision = auto.tick()  # at the limit (3): terminated and replaced in one tick
    auto.wait_for_bootstraps()
    assert [t.node_id for t in decision.terminate] == [bad]
    assert len(set(attempts)) == 2
    assert cluster.provider.list_nodes({"strato-node-kind": "worker"})[0].id != bad
    assert _kinds(auto).count("setup-failed") == 4


def test_instance_records_follow_events_through_the_lifecycle_table(cluster, tmp_path,
                                                                    monkeypatch):
    """Each machine has one stored record, moved only by events and only along ALLOWED:
    a capacity error sends the request back to QUEUED, the provider's answer allocates
    it, the bootstrap runs it; a terminated node stays TERMINATING until it is gone."""
    import strato.launcher.autoscaler.instances as instances
    from strato.launcher.autoscaler.lifecycle import NodeState, check_transition

    moves: list[tuple[str, str]] = []

    def recording(old, new):
        check_transition(old, new)
        moves.append((old.value, new.value))

    monkeypatch.setattr(instances, "check_transition", recording)
    auto, stub = _autoscaler(cluster, tmp_path)
    undo = inject_capacity_error(cluster.provider.ec2, zones=ZONES[:1])
    try:
        auto.tick()
    finally:
        undo()
    auto.wait_for_bootstraps()
    assert moves == [("queued", "requested"), ("requested", "queued"),
                     ("queued", "requested"), ("requested", "allocated"),
                     ("allocated", "setting_up"), ("setting_up", "running")]
    worker = cluster.provider.list_nodes({"strato-node-kind": "worker"})[0]
    head = cluster.require_head()
    assert auto.instances[worker.id].state == NodeState.RUNNING
    assert auto.instances[head.id].state == NodeState.RUNNING  # adopted from its tag

    moves.clear()
    assert auto.tick().is_noop and moves == []  # nothing re-derived: no moves
    cluster.provider.terminate_nodes([worker.id])  # gone behind the loop's back
    auto.tick()
    assert auto.instances[worker.id].state == NodeState.TERMINATED
    assert ("running", "terminated") in moves


def test_head_view_is_none_only_when_the_head_cannot_be_reached(tmp_path):
    from strato.exceptions import HeadUnreachableError, LauncherError
    from strato.launcher.autoscaler.head_view import HeadRuntime

    def no_head() -> str:
        raise LauncherError("cluster 'x' has no head node")

    assert HeadRuntime(no_head).view() is None
    assert HeadRuntime(lambda: str(tmp_path)).view() is None  # no runtime runs there

    class BrokenHead:
        def nodes(self):
            raise KeyError("a bug in an rpc")

        def close(self):
            pass

    runtime = HeadRuntime(lambda: str(tmp_path))
    runtime._client = BrokenHead()  # type: ignore[assignment]
    with pytest.raises(KeyError, match="a bug in an rpc"):
        runtime.view()  # not "head down"

    class LostHead(BrokenHead):
        def nodes(self):
            raise HeadUnreachableError("lost the connection")

    runtime._client = LostHead()  # type: ignore[assignment]
    assert runtime.view() is None and runtime._client is None  # reconnects next time
