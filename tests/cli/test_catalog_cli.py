"""`strato show-gpus`, `strato catalog show` and the GCP spec for a GPU chosen by name."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from strato.catalog import load_catalog
from strato.cli.main import cli
from strato.providers.base import NodeTypeSpec
from strato.providers.gcp import GCPProvider

pytestmark = pytest.mark.timeout(30)


def test_show_gpus_lists_the_catalogue_rows_of_one_model() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["show-gpus", "A10G", "--all", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    want = load_catalog().find(accelerator="A10G")
    assert len(rows) == len(want) > 0
    assert {r["accelerator"] for r in rows} == {"A10G"}
    assert {(r["instance_type"], r["region"]) for r in rows} == {
        (o.instance_type, o.region) for o in want}
    g5 = next(r for r in rows if r["instance_type"] == "g5.xlarge"
              and r["region"] == "us-east-1")
    assert (g5["count"], g5["gpu_memory_gib"], g5["price_per_hour"]) == (1, 24, 1.006)
    assert g5["spot_price_source"] == "catalog"
    # default: each type once, in its cheapest region
    short = json.loads(runner.invoke(cli, ["show-gpus", "a10g", "--json"]).output)["rows"]
    assert len(short) == len({o.instance_type for o in want})

    table = runner.invoke(cli, ["show-gpus", "A10G", "--region", "us-east-1"])
    assert table.exit_code == 0
    assert "g5.xlarge" in table.output and "$1.006" in table.output
    assert "(est.)" in table.output and "hand-entered" in table.output


def test_show_gpus_filters_and_errors() -> None:
    runner = CliRunner()
    rows = json.loads(runner.invoke(cli, ["show-gpus", "--cloud", "gcp", "--json"]).output)[
        "rows"]
    assert rows and {r["cloud"] for r in rows} == {"gcp"}
    assert any(r["instance_type"] == "n1-standard-4 + 1x T4" for r in rows)
    bad = runner.invoke(cli, ["show-gpus", "B300"])
    assert bad.exit_code == 1 and "known GPUs: A100" in bad.output
    assert "Traceback" not in bad.output
    shown = runner.invoke(cli, ["catalog", "show"])
    assert shown.exit_code == 0 and "2025-01-15" in shown.output


def test_gcp_attaches_gpus_that_the_machine_type_does_not_carry() -> None:
    provider = GCPProvider({"project_id": "p", "availability_zone": "us-central1-a"}, "c")
    spec = NodeTypeSpec("gpu", {"disks": []})
    n1 = provider.with_instance_type(spec, "n1-standard-4", "T4", 1)
    assert n1.node_config["machineType"] == "n1-standard-4"
    assert n1.node_config["guestAccelerators"] == [
        {"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]
    g2 = provider.with_instance_type(spec, "g2-standard-4", "L4", 1)
    assert "guestAccelerators" not in g2.node_config  # g2 carries its L4
    assert provider.catalog_region("europe-west4-b") == "europe-west4"
    assert provider.runtime_resources(n1)["GPU"] == 1.0
