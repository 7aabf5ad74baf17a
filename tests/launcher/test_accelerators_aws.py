"""GPUs by name on AWS (moto): `accelerators: A10G:1` launches the cheapest g5 type
(on-demand by list price, spot by live DescribeSpotPriceHistory prices), a capacity
error on that type moves to the next cheapest, every node carries its price, `status`
adds the prices up and `cost-report` keeps the cluster after `down`.

No head is created, so nothing here ever opens SSH (moto's IPs look real); the strict
address map makes any attempt fail loudly instead.
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from strato.cli.main import cli
from strato.launcher import reconcile
from strato.launcher.cluster import Cluster
from strato.launcher.config import load_config
from strato.launcher.pricing import TAG_PRICE, TAG_PRICE_SOURCE
from strato.ssh import ADDRESS_MAP_STRICT_ENV
from tests.harness.moto_server import MOTO_REGION, inject_capacity_error, set_spot_prices

pytestmark = pytest.mark.timeout(120)

ZONES = ["us-east-1a", "us-east-1b"]


@pytest.fixture
def gpu_cluster(moto_endpoint, tmp_path, monkeypatch):
    """A cluster YAML whose worker type names its GPU; returns a factory (spot: bool)."""
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STRATO_MONITOR", "off")
    monkeypatch.setenv(ADDRESS_MAP_STRICT_ENV, "1")

    def make(spot: bool) -> tuple[str, Cluster]:
        path = tmp_path / f"gpu-{spot}.yaml"
        path.write_text(yaml.safe_dump({
            "cluster_name": f"gpus-{'spot' if spot else 'od'}",
            "provider": {"type": "aws", "region": MOTO_REGION},
            "head_node_type": "head",
            "available_node_types": {
                "head": {"node_config": {"InstanceType": "m5.large"}},
                "gpu": {"accelerators": "A10G:1", "zones": ZONES, "spot": spot,
                        "fallback_to_on_demand": True, "max_workers": 4}}}))
        cluster = Cluster(load_config(path), echo=False)
        cluster.prepare()
        cluster.state.upsert(cluster.name, provider="aws", config_path=str(path),
                             config_hash="test")
        return str(path), cluster

    return make


def test_on_demand_takes_the_cheapest_g5_and_tags_its_price(gpu_cluster) -> None:
    _, cluster = gpu_cluster(spot=False)
    created, error = reconcile.create_workers(cluster, "gpu", 1, set())
    assert error is None and len(created) == 1
    (node,) = cluster.nodes(kind="worker")
    assert (node.instance_type, node.spot, node.zone) == ("g5.xlarge", False, "us-east-1a")
    assert node.tags[TAG_PRICE] == "1006000" and node.tags[TAG_PRICE_SOURCE] == "catalog"


def test_spot_takes_the_cheapest_live_price_and_moves_on_after_capacity_errors(
        gpu_cluster, monkeypatch) -> None:
    bigger = {(f"g5.{size}", zone): 2.0 for zone in ZONES for size in (
        "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")}
    set_spot_prices(monkeypatch, {**bigger,  # moto's own are all 0.00001
                                  ("g5.xlarge", "us-east-1a"): 0.61,
                                  ("g5.xlarge", "us-east-1b"): 0.55,
                                  ("g5.2xlarge", "us-east-1a"): 0.47,
                                  ("g5.2xlarge", "us-east-1b"): 0.49})
    _, cluster = gpu_cluster(spot=True)
    # the cheapest spot option, g5.2xlarge in us-east-1a, has no capacity anywhere
    undo = inject_capacity_error(cluster.provider.ec2, instance_types=["g5.2xlarge"])
    try:
        created, error = reconcile.create_workers(cluster, "gpu", 1, set())
    finally:
        undo()
    assert error is None
    (node,) = cluster.nodes(kind="worker")
    assert (node.instance_type, node.spot, node.zone) == ("g5.xlarge", True, "us-east-1b")
    assert node.tags[TAG_PRICE] == "550000" and node.tags[TAG_PRICE_SOURCE] == "live"
    events = [e["message"] for e in cluster.state.events(cluster.name)]
    assert any("no capacity for gpu g5.2xlarge spot in us-east-1a" in m
               and "trying g5.2xlarge spot in us-east-1b" in m for m in events)


def test_no_spot_capacity_for_any_g5_falls_back_to_on_demand(gpu_cluster) -> None:
    _, cluster = gpu_cluster(spot=True)
    ec2 = cluster.provider.ec2

    def spot_only(params, **_):  # every spot launch fails, on-demand gets through
        if params.get("InstanceMarketOptions"):
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity",
                                         "Message": "no spot (injected)"}}, "RunInstances")

    ec2.meta.events.register("before-parameter-build.ec2.RunInstances", spot_only,
                             unique_id="spot-only")
    try:
        created, error = reconcile.create_workers(cluster, "gpu", 1, set())
    finally:
        ec2.meta.events.unregister("before-parameter-build.ec2.RunInstances",
                                   unique_id="spot-only")
    assert error is None
    (node,) = cluster.nodes(kind="worker")
    assert (node.instance_type, node.spot) == ("g5.xlarge", False)


def test_status_prices_add_up_and_cost_report_keeps_the_cluster(gpu_cluster) -> None:
    path, cluster = gpu_cluster(spot=False)
    reconcile.create_workers(cluster, "gpu", 2, set())
    runner = CliRunner()
    result = runner.invoke(cli, ["status", path, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    nodes = [n for n in info["nodes"] if n["state"] in ("pending", "running")]
    assert len(nodes) == 2 and all(n["price_per_hour"] == 1.006 for n in nodes)
    assert info["cost"]["per_hour"] == pytest.approx(sum(n["price_per_hour"] for n in nodes))
    assert info["cost"]["so_far"] == pytest.approx(sum(n["cost_so_far"] for n in nodes),
                                                   abs=1e-6)
    assert info["cost"]["currency"] == "USD" and info["cost"]["estimated"] is False

    table = runner.invoke(cli, ["status", path])
    assert table.exit_code == 0 and "$1.006" in table.output and "$2.012/h" in table.output

    assert runner.invoke(cli, ["down", path, "-y"]).exit_code == 0
    report = runner.invoke(cli, ["cost-report", "--json"])
    assert report.exit_code == 0, report.output
    (row,) = json.loads(report.output)["clusters"]
    assert (row["cluster"], row["status"], row["nodes"]) == (cluster.name, "DOWN", 2)
    assert row["node_hours"] > 0 and row["cost"] == pytest.approx(row["node_hours"] * 1.006, abs=2e-6)
    text = runner.invoke(cli, ["cost-report"])
    assert text.exit_code == 0 and cluster.name in text.output and "DOWN" in text.output
