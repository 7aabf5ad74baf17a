"""Live figures from AWS (moto): spot prices and zone offerings through the provider,
and ``strato catalog update`` against DescribeInstanceTypes."""

from __future__ import annotations

import boto3
import pytest

from strato.catalog import CatalogError, load_catalog, parse_accelerators, resolve
from strato.catalog.update import refresh
from strato.providers.aws import AWSProvider
from tests.harness.moto_server import MOTO_REGION, set_spot_prices

pytestmark = pytest.mark.timeout(60)


def test_spot_prices_and_offerings_from_ec2(moto_endpoint, monkeypatch) -> None:
    set_spot_prices(monkeypatch, {("g5.xlarge", "us-east-1a"): 0.52,
                                  ("g5.2xlarge", "us-east-1a"): 0.44})
    provider = AWSProvider({"region": MOTO_REGION}, "prices")
    prices = provider.spot_prices(["g5.xlarge", "g5.2xlarge"])
    assert prices[("g5.xlarge", "us-east-1a")] == 0.52
    assert prices[("g5.2xlarge", "us-east-1a")] == 0.44
    offered = provider.zones_offering(["g5.xlarge", "p4d.24xlarge"])
    assert "us-east-1a" in offered["g5.xlarge"] and "us-east-1e" not in offered["g5.xlarge"]
    options = resolve(load_catalog(), [parse_accelerators("A10G:1")], cloud="aws",
                      region=MOTO_REGION, spot=True, zones=["us-east-1a"],
                      offered=offered | provider.zones_offering(["g5.2xlarge"]),
                      spot_prices=provider.spot_prices(
                          [o.instance_type for o in load_catalog().find(
                              accelerator="A10G", cloud="aws", region=MOTO_REGION)]))
    assert (options[0].instance_type, options[0].price, options[0].price_source) == (
        "g5.2xlarge", 0.44, "live")


def test_catalog_update_from_describe_instance_types(moto_endpoint, tmp_path) -> None:
    out = tmp_path / "catalog.csv"
    path, result = refresh(clouds=["aws"], aws_regions=[MOTO_REGION], output=str(out))
    fresh = load_catalog(path)
    g5 = fresh.offer("aws", "g5.xlarge", MOTO_REGION)
    assert (g5.accelerator, g5.accelerator_count, g5.vcpus, g5.memory_gib) == ("A10G", 1, 4, 16)
    assert g5.price == 1.006  # moto has no Pricing API: kept from the packaged catalogue
    assert any("Pricing API" in n for n in result.notes)
    assert fresh.offer("aws", "g5.xlarge", "us-west-2") is not None  # other regions kept
    assert fresh.offer("gcp", "g2-standard-4", "us-central1") is not None  # other cloud kept
    assert "DescribeInstanceTypes" in fresh.source and fresh.date
    assert load_catalog().date == "2025-01-15"  # the packaged file is untouched


def test_catalog_update_without_credentials_is_a_clear_error(monkeypatch, tmp_path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "none"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no IMDS lookup off loopback
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never the real AWS
    with pytest.raises(CatalogError, match="no AWS credentials"):
        refresh(clouds=["aws"], aws_regions=["us-east-1"], output=str(tmp_path / "c.csv"))
    assert not (tmp_path / "c.csv").exists()


def test_catalog_update_needs_a_gcp_project(tmp_path) -> None:
    with pytest.raises(CatalogError, match="needs a project"):
        refresh(clouds=["gcp"], output=str(tmp_path / "c.csv"))


def test_moto_client_sees_the_injected_prices(moto_endpoint, monkeypatch) -> None:
    set_spot_prices(monkeypatch, {("g5.xlarge", "us-east-1b"): 0.3})
    ec2 = boto3.client("ec2", region_name=MOTO_REGION)
    history = ec2.describe_spot_price_history(InstanceTypes=["g5.xlarge"])["SpotPriceHistory"]
    assert {h["AvailabilityZone"]: h["SpotPrice"] for h in history}["us-east-1b"] == "0.300000"
