"""Pure unit tests of placement-group bundle placement and resource naming."""

from __future__ import annotations

from strato.runtime import placement
from strato.runtime.scheduler import NodeView


def node(name: str, cpu: float, gpu: float = 0.0, draining: bool = False) -> NodeView:
    res = {"CPU": cpu, "GPU": gpu}
    return NodeView(name.encode(), res, dict(res), True, draining)


NODES = [node("a", 4), node("b", 2), node("c", 2, gpu=1)]


def test_strict_pack_one_node_or_none():
    assert placement.place_bundles([{"CPU": 2}, {"CPU": 2}], "STRICT_PACK", NODES) == [b"a", b"a"]
    assert placement.place_bundles([{"CPU": 3}, {"CPU": 2}], "STRICT_PACK", NODES) is None


def test_pack_falls_back_to_few_nodes():
    out = placement.place_bundles([{"CPU": 3}, {"CPU": 2}], "PACK", NODES)
    assert out is not None and out[0] == b"a" and out[1] in (b"b", b"c")


def test_strict_spread_distinct_nodes_all_or_none():
    out = placement.place_bundles([{"CPU": 1}] * 3, "STRICT_SPREAD", NODES)
    assert sorted(out) == [b"a", b"b", b"c"]
    assert placement.place_bundles([{"CPU": 1}] * 4, "STRICT_SPREAD", NODES) is None
    assert placement.place_bundles([{"GPU": 1}, {"GPU": 1}], "STRICT_SPREAD", NODES) is None


def test_spread_prefers_distinct_nodes_but_doubles_up_when_it_must():
    assert len(set(placement.place_bundles([{"CPU": 1}] * 3, "SPREAD", NODES))) == 3
    assert len(placement.place_bundles([{"CPU": 1}] * 5, "SPREAD", NODES)) == 5


def test_draining_nodes_take_no_bundles():
    nodes = [node("a", 4, draining=True), node("b", 2)]
    assert placement.place_bundles([{"CPU": 2}], "PACK", nodes) == [b"b"]


def test_group_shape_asks_for_the_bundle_resources():
    added = placement.bundle_resources("ab", 1, {"CPU": 2, "GPU": 1})
    assert added["CPU_group_1_ab"] == 2 and added["CPU_group_ab"] == 2
    assert added["GPU_group_1_ab"] == 1 and added["bundle_group_1_ab"] > 0
    assert placement.group_shape({"CPU": 1}, "ab", 1) == {"CPU_group_1_ab": 1.0,
                                                          "bundle_group_1_ab": 0.001}
    assert placement.group_shape({}, "ab", -1) == {"bundle_group_ab": 0.001}
    assert placement.gpu_amount(placement.group_shape({"GPU": 1}, "ab", 0)) == 1
    assert placement.is_group_shape(placement.group_shape({}, "ab", 0))
    assert not placement.is_group_shape({"CPU": 1})
