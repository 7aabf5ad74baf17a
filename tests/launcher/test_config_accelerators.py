"""``accelerators:`` / ``any_of:`` on node types: parsed, checked against the catalogue,
and part of the launch hash; the cost history in the local state."""

from __future__ import annotations

import pytest

from strato.exceptions import ConfigError
from strato.launcher.config import load_config_from_dict
from strato.launcher.pricing import node_cost, summarize_costs
from strato.launcher.state import NodeCostRecord, StateDB

pytestmark = pytest.mark.timeout(30)


def aws(**gpu) -> dict:
    return {"cluster_name": "c", "provider": {"type": "aws", "region": "us-east-1"},
            "head_node_type": "head",
            "available_node_types": {
                "head": {"node_config": {"InstanceType": "m5.large"}},
                "gpu": {"spot": True, "fallback_to_on_demand": True, **gpu}}}


def test_accelerators_instead_of_an_instance_type() -> None:
    config = load_config_from_dict(aws(accelerators="A10G:1"))
    assert [str(r) for r in config.accelerator_requests("gpu")] == ["A10G:1"]
    spec = config.node_type_spec("gpu")
    assert spec.resources == {"GPU": 1.0, "accelerator_type:A10G": 1.0}
    assert config.accelerator_requests("head") == []
    other = load_config_from_dict(aws(accelerators={"A10G": 4}))
    assert other.launch_hash("gpu") != config.launch_hash("gpu")
    alts = load_config_from_dict(aws(any_of=[{"accelerators": "A100:8"}, "H100:8"]))
    assert [str(r) for r in alts.accelerator_requests("gpu")] == ["A100:8", "H100:8"]
    assert alts.node_type_spec("gpu").resources == {"GPU": 8.0}


@pytest.mark.parametrize("gpu, words", [
    ({"accelerators": "A100:0"}, "count must be >= 1"),
    ({"accelerators": "A100", "any_of": ["H100"]}, "not both"),
    ({"accelerators": "A10G", "node_config": {"InstanceType": "g5.xlarge"}},
     "node_config.InstanceType: names an instance type"),
    ({"accelerators": "A10G", "cloud": "gcp"}, "gpu.cloud: 'gcp': the cluster's nodes are on aws"),
    ({"accelerators": "A10G", "region": "eu-west-1"}, "the provider's region is 'us-east-1'"),
    ({"accelerators": "B300"}, "no GPU called B300"),
    ({"any_of": ["A100:8", {"accelerators": "B300"}]}, None),  # one alternative exists: fine
])
def test_accelerator_errors(gpu, words) -> None:
    if words is None:
        load_config_from_dict(aws(**gpu))
        return
    with pytest.raises(ConfigError, match=words):
        load_config_from_dict(aws(**gpu))


def test_region_without_the_gpu_names_where_it_is() -> None:
    data = aws(accelerators="A100:8")
    data["provider"]["region"] = "us-west-1"
    with pytest.raises(ConfigError, match=r"no 8 x A100 in us-west-1; nearest: us-"):
        load_config_from_dict(data)


def test_ssh_cannot_choose_types_by_gpu() -> None:
    data = {"provider": {"type": "ssh", "head_ip": "10.0.0.1"}, "head_node_type": "h",
            "available_node_types": {"h": {}, "g": {"accelerators": "L4"}}}
    with pytest.raises(ConfigError, match="cannot choose instance types by GPU"):
        load_config_from_dict(data)


def rec(node_id: str, cluster: str = "a", price: float | None = 1.0, spot: bool = False,
        source: str = "catalog", launched: float = 0.0, last_seen: float = 3600.0,
        ended: float | None = None) -> NodeCostRecord:
    return NodeCostRecord(cluster, node_id, "aws", "gpu", "worker", "g5.xlarge", "us-east-1a",
                          spot, price, source, launched, last_seen, ended)


def test_cost_history_survives_forgetting_the_cluster(tmp_path) -> None:
    db = StateDB(tmp_path)
    db.upsert("a", provider="aws", config_path="/c.yaml", config_hash="h")
    db.record_nodes([rec("i-1"), rec("i-2", price=None)])
    db.record_nodes([rec("i-1", price=None, launched=100.0, last_seen=7200.0),
                     rec("i-2", price=2.0, source="live")])
    db.end_nodes("a", 5400.0, ["i-2"])
    db.delete("a")
    rows = {r.node_id: r for r in db.node_costs("a")}
    assert (rows["i-1"].price, rows["i-1"].launched, rows["i-1"].last_seen,
            rows["i-1"].ended) == (1.0, 0.0, 7200.0, None)
    assert (rows["i-2"].price, rows["i-2"].price_source, rows["i-2"].ended) == (2.0, "live",
                                                                                 5400.0)
    db.end_nodes("a", 9000.0)
    assert {r.ended for r in db.node_costs("a")} == {5400.0, 9000.0}


def test_summaries_add_up_and_mark_estimates() -> None:
    assert node_cost(2.0, 0.0, 1800.0) == (0.5, 1.0)
    records = [rec("i-1", ended=7200.0), rec("i-2", price=0.4, spot=True, source="live",
                                              ended=3600.0),
               rec("i-3", cluster="b", price=0.5, spot=True, source="catalog"),
               rec("i-4", cluster="c", launched=10_000.0)]
    by = {c.cluster: c for c in summarize_costs(records, {"c": True}, now=13_600.0)}
    assert by["a"].node_hours == pytest.approx(3.0) and by["a"].cost == pytest.approx(2.4)
    assert not by["a"].estimated and by["a"].ended == 7200.0
    assert by["b"].estimated  # a catalogue spot price, and its end only last seen
    assert by["c"].ended is None and by["c"].node_hours == pytest.approx(1.0)
    assert by["c"].as_dict()["status"] == "UP"
