"""GPUs by name on GCP (the GCE fake): `accelerators: T4:1` launches the cheapest n1 +
T4 as spot at the catalogue's price, attached as guestAccelerators and labelled with its
price; `status --json` carries it (an estimate: GCP spot prices come from the catalogue).
No head is created, so nothing opens SSH."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from strato.cli.main import cli
from strato.launcher import reconcile
from strato.launcher.cluster import Cluster
from strato.launcher.config import load_config
from strato.ssh import ADDRESS_MAP_STRICT_ENV

pytestmark = pytest.mark.timeout(120)


def test_t4_by_name_on_the_gce_fake(gce_fake, gce_provider_config, tmp_path,
                                    monkeypatch) -> None:
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STRATO_MONITOR", "off")
    monkeypatch.setenv(ADDRESS_MAP_STRICT_ENV, "1")
    path = tmp_path / "gcp.yaml"
    path.write_text(yaml.safe_dump({
        "cluster_name": "gpus", "provider": gce_provider_config, "head_node_type": "head",
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-4"}},
            "gpu": {"accelerators": "T4", "spot": True, "max_workers": 2}}}))
    cluster = Cluster(load_config(path), echo=False)
    cluster.prepare()
    cluster.state.upsert(cluster.name, provider="gcp", config_path=str(path),
                         config_hash="test")
    created, error = reconcile.create_workers(cluster, "gpu", 1, set())
    assert error is None and len(created) == 1
    body = gce_fake.instances[created[0].id]
    assert body["machineType"].endswith("/n1-standard-4")
    assert [a["acceleratorType"].rsplit("/", 1)[-1] for a in body["guestAccelerators"]] == [
        "nvidia-tesla-t4"]
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["labels"]["strato-price"] == "150000"  # $0.15/h: the catalogue's spot price

    result = CliRunner().invoke(cli, ["status", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    (node,) = [n for n in info["nodes"] if n["type"] == "gpu"]
    assert (node["price_per_hour"], node["price_source"]) == (0.15, "catalog")
    assert info["cost"]["per_hour"] == pytest.approx(0.15) and info["cost"]["estimated"]
