"""Clusters have owners: two ``$STRATO_HOME``s (two users, or two configs) with the same
cluster name in one AWS account (moto) never touch each other's nodes unless told to
(``--force``); the owner id is random per home, 0600, and a valid tag/label value."""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from strato.exceptions import LauncherError, OwnerConflictError
from strato.launcher import commands, reconcile
from strato.launcher.cluster import Cluster, open_cluster
from strato.launcher.config import load_config
from strato.localfiles import owner_id
from strato.providers.base import TAG_OWNER

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("monitor_off")]


def test_owner_id_is_random_per_home_stable_0600_and_a_valid_label(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "a"))
    first = owner_id()
    assert owner_id() == first
    assert re.fullmatch(r"[a-z0-9_-]{1,63}", first)  # a GCE label value as it is
    assert stat.S_IMODE((tmp_path / "a" / "owner").stat().st_mode) == 0o600
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "b"))
    assert owner_id() != first


def _config(path: Path, key_path: str) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": "default",
        "provider": {"type": "aws", "region": "us-east-1", "availability_zone": "us-east-1a"},
        "auth": {"ssh_user": "root", "ssh_private_key": key_path},
        "runtime_python": sys.executable,
        "available_node_types": {"head": {"node_config": {"InstanceType": "t3.medium"},
                                          "max_workers": 0}},
        "head_node_type": "head",
    }))
    return path


def _alive(ec2) -> dict[str, dict[str, str]]:
    out = {}
    for r in ec2.describe_instances(Filters=[
            {"Name": "tag:strato-cluster", "Values": ["default"]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]:
        for i in r["Instances"]:
            out[i["InstanceId"]] = {t["Key"]: t["Value"] for t in i["Tags"]}
    return out


def test_same_cluster_name_two_owners(moto_endpoint, ssh_address_map, tmp_path, monkeypatch,
                                      ssh_host_network):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    config = _config(tmp_path / "c.yaml", ssh_host_network.key_path)

    # alice's head, created as `up` creates it (tagged with her owner id)
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "alice"))
    alice = owner_id()
    cluster = open_cluster(config, prepare=True)
    spec = cluster.config.node_type_spec("head")
    [hers] = cluster.provider.create_nodes(spec, 1, cluster.new_tags("head", "head"))
    assert _alive(ec2)[hers.id][TAG_OWNER] == alice

    # bob, same config and cluster name, another home: nothing of alice's is touched
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "bob"))
    bob = owner_id()
    with pytest.raises(OwnerConflictError) as info:
        reconcile.up(config, yes=True)
    message = str(info.value)
    assert alice in message and bob in message and "--force" in message
    assert hers.id in message and "'default'" in message
    assert list(_alive(ec2)) == [hers.id]  # bob created nothing
    with pytest.raises(OwnerConflictError, match=alice):
        reconcile.down(config, yes=True)
    with pytest.raises(LauncherError, match=f"another owner, {alice}"):
        commands.exec_(config, "true")
    assert list(_alive(ec2)) == [hers.id]

    # up --force: bob's own head beside hers (its setup fails here: the test maps no
    # address, so nothing is contacted), hers left as it was
    with pytest.raises(LauncherError):
        reconcile.up(config, yes=True, force=True)
    alive = _alive(ec2)
    [his] = [i for i in alive if i != hers.id]
    assert alive[his][TAG_OWNER] == bob and alive[hers.id][TAG_OWNER] == alice
    assert "strato-status" not in alive[hers.id] or \
        alive[hers.id]["strato-status"] == "pending"

    # bob's down takes only his node; down --force (a lost home, say) takes hers too
    assert reconcile.down(config, yes=True) == [his]
    assert list(_alive(ec2)) == [hers.id]
    assert reconcile.down(config, yes=True, force=True) == [hers.id]
    assert _alive(ec2) == {}


def test_the_monitor_tags_its_nodes_with_the_launchers_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "head-home"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "m", "provider": {"type": "local"},
        "available_node_types": {"head": {"resources": {"CPU": 1}}}, "head_node_type": "head"}))
    monitor_side = Cluster(load_config(config), overrides={"owner": "alice-0123456789ab"})
    assert monitor_side.new_tags("worker", "head")[TAG_OWNER] == "alice-0123456789ab"
    assert monitor_side.provider_config()["owner"] == "alice-0123456789ab"
