"""Autostop on AWS (moto): the head's instance profile, and the monitor tearing down.

``up``'s ``prepare`` makes the head's role and instance profile (only the EC2 calls the
monitor makes); the head is launched with it, workers without. The autoscaler loop runs
with a stub head whose ``activity()`` reports the cluster idle: autostop terminates (or
stops, ``down: false``) every instance, the head last, and the next ``up`` starts
stopped ones again. moto's instance IPs are never contacted.
"""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.loop import Autoscaler
from strato.launcher.cluster import Cluster
from strato.launcher.config import AutostopConfig, load_config_from_dict
from strato.launcher.reconcile import _start_stopped
from strato.launcher.state import StateDB
from strato.providers.aws import HEAD_CHANGE_ACTIONS, head_role_name
from strato.providers.base import (
    TAG_AUTOSTOPPED,
    TAG_GOING_DOWN,
    TAG_STATUS,
    NodeState,
    NodeStatus,
)
from tests.launcher.autoscaler_stubs import StubHead

pytestmark = pytest.mark.timeout(60)

REGION = "us-east-1"


def _cluster(tmp_path, autostop: Any) -> Cluster:
    config = load_config_from_dict({
        "cluster_name": "idle",
        "provider": {"type": "aws", "region": REGION, "monitor": "head"},
        "autoscaler": {"tick_seconds": 0.1},
        "autostop": autostop,
        "available_node_types": {
            "head": {"node_config": {"InstanceType": "t3.medium"}},
            "wk": {"node_config": {"InstanceType": "m5.large"}, "min_workers": 2,
                   "max_workers": 3},
        },
        "head_node_type": "head",
    })
    state = StateDB(tmp_path / "home")
    c = Cluster(config, state=state, echo=False)
    c.prepare()
    state.upsert(c.name, provider="aws", config_path="c.yaml", config_hash=c.config_hash())
    state.set_head(c.name, "10.0.0.1:6380")
    c.token = "test-token"
    head = c.provider.create_nodes(config.node_type_spec("head"), 1,
                                   c.new_tags("head", "head"))[0]
    c.provider.set_tags(head.id, {TAG_STATUS: NodeStatus.UP_TO_DATE.value})
    return c


@pytest.fixture
def home(moto_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATO_MONITOR", raising=False)
    return tmp_path


def _instances(ec2, states=("pending", "running", "stopping", "stopped")) -> list[dict]:
    out = []
    for r in ec2.describe_instances(Filters=[
            {"Name": "tag:strato-cluster", "Values": ["idle"]},
            {"Name": "instance-state-name", "Values": list(states)}])["Reservations"]:
        out += r["Instances"]
    return out


def _kind(inst: dict) -> str:
    return {t["Key"]: t["Value"] for t in inst["Tags"]}["strato-node-kind"]


def _autoscaler(cluster: Cluster, tmp_path, clock: list[float]) -> tuple[Autoscaler, StubHead]:
    stub = StubHead(cluster)
    auto = Autoscaler(cluster, runtime=stub, bootstrapper=stub.bootstrap,
                      events=EventLog(tmp_path / "events.jsonl"),
                      head_address="10.0.0.1:6380", clock=lambda: clock[0])
    stub.started.add(cluster.require_head().id)
    return auto, stub


def test_head_gets_an_instance_profile_limited_to_the_monitors_calls(home):
    cluster = _cluster(home, {"idle_minutes": 10})
    ec2 = boto3.client("ec2", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    name = head_role_name("idle")
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    trust = iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    policy = iam.get_role_policy(RoleName=name, PolicyName="strato-monitor")["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    actions = {a for st in policy["Statement"] for a in
               ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:StopInstances",
            "ec2:DescribeInstances", "ec2:CreateTags"} <= actions
    assert not any(a.startswith("iam:") or a == "ec2:*" for a in actions)
    own = next(st for st in policy["Statement"] if st.get("Sid") == "OwnCluster")
    assert set(own["Action"]) == set(HEAD_CHANGE_ACTIONS)
    assert own["Condition"] == {"StringEquals": {"ec2:ResourceTag/strato-cluster": "idle"}}

    (head,) = _instances(ec2)
    assert head["IamInstanceProfile"]["Arn"] == profile["Arn"]
    # workers never call AWS: no profile
    worker = cluster.provider.create_nodes(cluster.config.node_type_spec("wk"), 1,
                                           cluster.new_tags("worker", "wk"))[0]
    (w,) = [i for i in _instances(ec2) if i["InstanceId"] == worker.id]
    assert "IamInstanceProfile" not in w

    # a second prepare (another `up`) reuses them: still one role, one profile
    cluster.prepare()
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
            ].count(name) == 1


def test_no_profile_when_the_monitor_is_not_on_the_head(home, monkeypatch):
    monkeypatch.setenv("STRATO_MONITOR", "local")
    _cluster(home, None)
    iam = boto3.client("iam", region_name=REGION)
    assert iam.list_instance_profiles()["InstanceProfiles"] == []
    assert "IamInstanceProfile" not in _instances(boto3.client("ec2", region_name=REGION))[0]


def test_autostop_terminates_every_instance_head_last(home):
    cluster = _cluster(home, {"idle_minutes": 10})
    ec2 = boto3.client("ec2", region_name=REGION)
    clock = [1000.0]
    auto, stub = _autoscaler(cluster, home, clock)
    auto.tick()
    auto.wait_for_bootstraps()
    assert len(_instances(ec2)) == 3  # head + min_workers 2
    stub.idle_seconds = 1e6
    clock[0] += 9 * 60  # the monitor has run 9 of the 10 minutes: not yet
    assert auto.tick() is not None and not auto.stop.is_set()
    assert len(_instances(ec2, ("pending", "running"))) == 3
    clock[0] += 61
    auto.tick()
    assert auto.stop.is_set()
    assert _instances(ec2) == []  # all shutting-down / terminated
    (event,) = [e for e in auto.events.read() if e["kind"] == "autostop"]
    assert event["message"] == "autostop: idle for 10m: terminating 3 node(s)"
    assert auto.autostopped[-1] == cluster.provider.list_nodes(
        {"strato-node-kind": "head"}, include_terminated=True)[0].id  # head last
    head = cluster.provider.list_nodes({"strato-node-kind": "head"}, include_terminated=True)[0]
    assert head.tags[TAG_GOING_DOWN] == "all" and head.tags[TAG_AUTOSTOPPED]
    record = cluster.state.get("idle")
    assert record is not None and record.head_address is None
    assert any(e["message"].startswith("autostopped: idle for 10m")
               for e in cluster.state.events("idle"))
    assert auto.tick().is_noop  # held: the head is gone


def test_autostop_waits_while_active(home):
    cluster = _cluster(home, {"idle_minutes": 1})
    clock = [1000.0]
    auto, stub = _autoscaler(cluster, home, clock)
    auto.tick()
    auto.wait_for_bootstraps()
    clock[0] += 3600
    stub.idle_seconds = None  # a client session is connected
    auto.tick()
    stub.idle_seconds = 30.0  # idle, but only for 30 s
    auto.tick()
    assert not auto.stop.is_set()
    assert len(_instances(boto3.client("ec2", region_name=REGION), ("running",))) == 3


def test_autostop_down_false_stops_and_up_starts_them_again(home):
    cluster = _cluster(home, {"idle_minutes": 1, "down": False})
    ec2 = boto3.client("ec2", region_name=REGION)
    clock = [1000.0]
    auto, stub = _autoscaler(cluster, home, clock)
    auto.tick()
    auto.wait_for_bootstraps()
    stub.idle_seconds = 120.0
    clock[0] += 120
    auto.tick()
    states = {i["State"]["Name"] for i in _instances(ec2)}
    assert states == {"stopped"} and len(_instances(ec2)) == 3
    (event,) = [e for e in auto.events.read() if e["kind"] == "autostop"]
    assert "stopping 3 node(s)" in event["message"]
    assert cluster.head() is None  # not running: the client's init runs `up`

    _start_stopped(cluster)
    assert {i["State"]["Name"] for i in _instances(ec2)} == {"running"}
    assert [n.state for n in cluster.nodes(kind="head")] == [NodeState.RUNNING]


def test_init_autostop_override_file_wins(home, tmp_path):
    from strato.launcher.autoscaler import autostop

    cluster = _cluster(home, None)
    clock = [1000.0]
    auto, stub = _autoscaler(cluster, home, clock)
    auto.autostop_file = tmp_path / autostop.OVERRIDE_FILE
    assert auto.autostop_setting() is None
    autostop.write_override(auto.autostop_file, AutostopConfig.parse(0.5))
    stub.idle_seconds = 40.0
    clock[0] += 40
    auto.tick()
    assert auto.stop.is_set()
    assert _instances(boto3.client("ec2", region_name=REGION)) == []
