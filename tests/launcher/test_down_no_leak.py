"""`strato down` leaves nothing behind while the head's autoscaler keeps `min_workers`.

moto for EC2, with terminated instances in ``shutting-down`` for a few seconds as on AWS,
and the monitor where it runs by default: on the head (a test sshd host), talking to the
same moto through the hosts' bridge. Every instance moto creates, whoever asks, is mapped
to a test host before its address is known, so the head's autoscaler could set up
replacements: only `down` stopping it first keeps it from relaunching `min_workers`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from strato.launcher import reconcile
from strato.launcher.state import StateDB
from tests.harness.moto_server import (
    SHUTDOWN_SECONDS,
    map_instances_to_hosts,
    monitor_env_for,
)
from tests.harness.ssh_hosts import stop_strato, strato_processes

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_strato_left")]

TICK = 0.2
# after the last instance is fully terminated, watch this long for relaunches: the old
# bug relaunched within a tick or two of seeing the workers gone (here: 25 ticks)
WATCH_SECONDS = 5.0


@pytest.fixture
def cloud(moto_endpoint, moto_bridge_server, ssh_hosts, ssh_address_map, monkeypatch,
          tmp_path):
    """moto + hosts for its instances + a monitor on the head that can reach moto."""
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATO_MONITOR", raising=False)  # the default: on the head
    monkeypatch.setenv("STRATO_MONITOR_ENV", json.dumps(monitor_env_for(moto_bridge_server)))
    created = map_instances_to_hosts(monkeypatch, ssh_address_map,
                                     {"head": ssh_hosts[:1], "worker": ssh_hosts[1:]})
    return boto3.client("ec2", region_name="us-east-1"), created


def _config(path: Path, key_path: str) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": "leak",
        "provider": {"type": "aws", "region": "us-east-1", "availability_zone": "us-east-1a"},
        "auth": {"ssh_user": "root", "ssh_private_key": key_path},
        "runtime_python": sys.executable,
        "autoscaler": {"tick_seconds": TICK},
        "available_node_types": {
            "head": {"node_config": {"InstanceType": "t3.medium"}, "max_workers": 0},
            "spot_worker": {"node_config": {"InstanceType": "m5.large"}, "spot": True,
                            "min_workers": 2, "max_workers": 4},
        },
        "head_node_type": "head",
    }))
    return path


def _instances(ec2, kind: str | None = None) -> list[dict]:
    filters = [{"Name": "tag:strato-cluster", "Values": ["leak"]}]
    if kind:
        filters.append({"Name": "tag:strato-node-kind", "Values": [kind]})
    out = []
    for r in ec2.describe_instances(Filters=filters)["Reservations"]:
        out += r["Instances"]
    return out


def _live(ec2, kind: str | None = None) -> list[str]:
    return [i["InstanceId"] for i in _instances(ec2, kind)
            if i["State"]["Name"] in ("pending", "running")]


def _settled(ec2, kind: str | None = None) -> None:
    """Wait (bounded) until no instance is shutting down, then watch for relaunches."""
    deadline = time.monotonic() + SHUTDOWN_SECONDS + 30
    while any(i["State"]["Name"] == "shutting-down" for i in _instances(ec2, kind)):
        assert time.monotonic() < deadline, "instances stuck in shutting-down"
        time.sleep(0.2)
    watch_until = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < watch_until:
        assert _live(ec2, kind) == [], f"relaunched while going down: {_live(ec2, kind)}"
        time.sleep(0.25)


def _monitor_running(host) -> bool:
    return "strato.launcher.monitor" in strato_processes(host)


def test_down_stops_the_head_autoscaler_before_terminating(cloud, ssh_hosts, shared_tmp_path):
    ec2, created = cloud
    config = _config(shared_tmp_path / "leak.yaml", ssh_hosts[0].key_path)
    try:
        reconcile.up(config, yes=True)
        assert len(_live(ec2, "worker")) == 2
        assert _monitor_running(ssh_hosts[0])

        ids = reconcile.down(config, yes=True)
        assert len(ids) == 3
        assert not _monitor_running(ssh_hosts[0]), "down left the monitor running"
        _settled(ec2)
        assert len(created) == 3, f"instances launched behind down's back: {created}"
        assert StateDB().get("leak") is None
    finally:
        if StateDB().get("leak") is not None:
            reconcile.down(config, yes=True)
        for h in ssh_hosts:  # terminating a moto instance stops nothing on the host
            stop_strato(h)


def test_down_workers_only_keeps_them_down(cloud, ssh_hosts, shared_tmp_path):
    ec2, created = cloud
    config = _config(shared_tmp_path / "leak.yaml", ssh_hosts[0].key_path)
    try:
        reconcile.up(config, yes=True)
        workers = _live(ec2, "worker")
        assert len(workers) == 2

        ids = reconcile.down(config, yes=True, workers_only=True)
        assert sorted(ids) == sorted(workers)
        # the monitor runs on (it launches for demand), with min_workers 0
        assert _monitor_running(ssh_hosts[0])
        _settled(ec2, "worker")
        assert len(_live(ec2, "head")) == 1
        assert len(created) == 3, f"instances launched behind down's back: {created}"

        # `up` restores min_workers
        assert len(reconcile.up(config, yes=True).created) == 2
        reconcile.down(config, yes=True)
        _settled(ec2)
    finally:
        if StateDB().get("leak") is not None:
            reconcile.down(config, yes=True)
        for h in ssh_hosts:
            stop_strato(h)


def test_autoscaler_holds_while_the_head_is_marked_going_down(cloud, ssh_hosts,
                                                              shared_tmp_path):
    """Defence in depth: a monitor that `down` could not stop still launches nothing."""
    from strato.launcher.autoscaler.events import EventLog
    from strato.launcher.autoscaler.loop import Autoscaler
    from strato.launcher.cluster import Cluster
    from strato.launcher.config import load_config
    from strato.providers.base import TAG_GOING_DOWN, TAG_STATUS, NodeStatus
    from tests.launcher.autoscaler_stubs import StubHead

    ec2, _ = cloud
    path = _config(shared_tmp_path / "leak.yaml", ssh_hosts[0].key_path)
    cluster = Cluster(load_config(path), echo=False)
    cluster.prepare()
    spec = cluster.config.node_type_spec("head")
    head = cluster.provider.create_nodes(spec, 1, cluster.new_tags("head", "head"))[0]
    cluster.provider.set_tags(head.id, {TAG_STATUS: NodeStatus.UP_TO_DATE.value})
    stub = StubHead(cluster)
    stub.started.add(head.id)
    auto = Autoscaler(cluster, runtime=stub, bootstrapper=stub.bootstrap,
                      events=EventLog(shared_tmp_path / "events.jsonl"),
                      head_address="10.0.0.1:6380")
    try:
        cluster.provider.set_tags(head.id, {TAG_GOING_DOWN: "workers"})
        assert auto.tick().is_noop and _live(ec2, "worker") == []
        assert not auto.stop.is_set()
        cluster.provider.set_tags(head.id, {TAG_GOING_DOWN: "all"})
        auto.tick()
        assert auto.stop.is_set() and _live(ec2, "worker") == []
        cluster.provider.set_tags(head.id, {TAG_GOING_DOWN: ""})
        auto.stop.clear()
        cluster.provider.terminate_nodes([head.id])  # head shutting down: still nothing
        assert auto.tick().is_noop and _live(ec2, "worker") == []
        holds = [e["message"] for e in auto.events.read() if e["kind"] == "hold"]
        assert len(holds) == 3, holds
    finally:
        auto.close()
        cluster.provider.terminate_nodes([n.id for n in cluster.nodes(alive_only=False)])


# ------------------------------------------------------------------ the same on the GCE fake
GCP_NAME = "gleak"


@pytest.fixture
def gce_pool(gce_host_pool, gce_bridge_fake, monkeypatch, tmp_path):
    """The strict GCE fake on the hosts' bridge, its VMs played by the test hosts; the
    monitor runs on the head (GCP's default) and reaches the same fake."""
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATO_MONITOR", raising=False)
    return gce_bridge_fake


def _gcp_config(path: Path, endpoint: str) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": GCP_NAME,
        "provider": {"type": "gcp", "project_id": "strato-test",
                     "availability_zone": "us-central1-a", "api_endpoint": endpoint},
        "auth": {"ssh_user": "root"},
        "runtime_python": sys.executable,
        "autoscaler": {"tick_seconds": TICK},
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"},
                     "resources": {"CPU": 2}},
            "spot_worker": {"node_config": {"machineType": "n2-standard-4"}, "spot": True,
                            "resources": {"CPU": 2}, "min_workers": 2, "max_workers": 2},
        },
        "head_node_type": "head",
    }))
    return path


def _gce_live(fake, kind: str | None = None) -> list[str]:
    return [name for name, inst in fake.instances.items()
            if inst["status"] not in ("STOPPING", "TERMINATED")
            and (kind is None or inst["labels"].get("strato-node-kind") == kind)]


def _inserts(fake) -> int:
    return sum(1 for r in fake.requests_matching("POST", "/instances")
               if r.path.endswith("/instances"))


def _gce_watch(fake, kind: str | None = None) -> None:
    """Every deletion finished, then no VM of ``kind`` comes back for WATCH_SECONDS."""
    fake.settle(timeout=30)
    watch_until = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < watch_until:
        assert _gce_live(fake, kind) == [], f"relaunched while going down: {_gce_live(fake)}"
        time.sleep(0.25)


def test_gcp_down_and_down_workers_only_leave_nothing(gce_pool, ssh_hosts, shared_tmp_path):
    fake = gce_pool
    config = _gcp_config(shared_tmp_path / "gleak.yaml", fake.endpoint)
    try:
        reconcile.up(config, yes=True)
        workers = _gce_live(fake, "worker")
        assert len(workers) == 2

        assert sorted(reconcile.down(config, yes=True, workers_only=True)) == sorted(workers)
        _gce_watch(fake, "worker")
        assert len(_gce_live(fake, "head")) == 1
        inserts = _inserts(fake)

        reconcile.up(config, yes=True)
        assert len(_gce_live(fake, "worker")) == 2
        reconcile.down(config, yes=True)
        _gce_watch(fake)
        assert fake.instances == {} and StateDB().get(GCP_NAME) is None
        # two inserts for the workers `up` restored, none behind down's back
        assert _inserts(fake) == inserts + 2
        for host in ssh_hosts:  # every VM halted: nothing strato started still runs
            assert host.init_pid == 0 or not strato_processes(host), host.name
    finally:
        if StateDB().get(GCP_NAME) is not None:
            reconcile.down(config, yes=True)
        fake.settle(timeout=30)
