"""Autostop on GCE (the fake): the head is created with a service account and the compute
scope, so the monitor beside it can tear the cluster down with the head's own identity.

Creating a dedicated service account needs the IAM API (not served by the fake, not
called by strato): the project's default compute account unless
``provider.service_account`` names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strato.launcher.cluster import Cluster
from strato.launcher.config import load_config_from_dict
from strato.launcher.state import StateDB
from strato.providers.gcp import COMPUTE_SCOPE

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
