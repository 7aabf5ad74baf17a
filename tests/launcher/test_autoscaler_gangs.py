"""Pure unit tests of placement groups in the autoscaler decision: a pending group is
one gang demand, launched for all of its bundles together or not at all."""

from __future__ import annotations

from strato.launcher.autoscaler import GangDemand, NodeInfo, NodeState, demand_from_head, plan
from tests.launcher.test_autoscaler_plan import CPU4, GPU1, launched, snap

GPU4 = GPU1.__class__("gpu4", {"CPU": 32, "GPU": 4})


def gang(strategy: str, *bundles: dict) -> GangDemand:
    return GangDemand(tuple(bundles), strategy)


def test_strict_spread_launches_one_node_per_bundle():
    p = plan(snap(GPU1, GPU4, gangs=[gang("STRICT_SPREAD", {"GPU": 1}, {"GPU": 1})]))
    assert launched(p) == {"gpu1": 2}
    assert "placement group" not in " ".join(p.warnings)


def test_strict_spread_even_where_one_node_could_hold_all():
    p = plan(snap(GPU4, gangs=[gang("STRICT_SPREAD", {"GPU": 1}, {"GPU": 1}, {"GPU": 1})]))
    assert launched(p) == {"gpu4": 3}


def test_strict_pack_launches_one_node_that_fits_the_sum():
    p = plan(snap(GPU1, GPU4, gangs=[gang("STRICT_PACK", {"GPU": 1}, {"GPU": 1})]))
    assert launched(p) == {"gpu4": 1}


def test_pack_fills_new_nodes_with_as_many_bundles_as_fit():
    p = plan(snap(CPU4, gangs=[gang("PACK", *[{"CPU": 2}] * 5)]))
    assert launched(p) == {"cpu4": 3}


def test_gang_uses_existing_free_room_first():
    free = NodeInfo("w1", "gpu1", available={"CPU": 8, "GPU": 1})
    p = plan(snap(GPU1, nodes=[free], gangs=[gang("STRICT_SPREAD", {"GPU": 1}, {"GPU": 1})]))
    assert launched(p) == {"gpu1": 1}


def test_pending_nodes_count_so_the_next_tick_launches_nothing_more():
    pending = [NodeInfo(f"w{i}", "gpu1", state=NodeState.REQUESTED) for i in range(2)]
    p = plan(snap(GPU1, nodes=pending, gangs=[gang("STRICT_SPREAD", {"GPU": 1}, {"GPU": 1})]))
    assert launched(p) == {}


def test_all_or_nothing_under_max_workers():
    capped = GPU1.__class__("gpu1", {"CPU": 8, "GPU": 1}, max_workers=1)
    p = plan(snap(capped, gangs=[gang("STRICT_SPREAD", {"GPU": 1}, {"GPU": 1})]))
    assert launched(p) == {}
    assert any("waiting: placement group STRICT_SPREAD" in w and "max_workers" in w
               for w in p.warnings)


def test_infeasible_bundle_launches_nothing_for_the_group():
    p = plan(snap(GPU1, gangs=[gang("PACK", {"GPU": 1}, {"GPU": 8})]))
    assert launched(p) == {}
    assert any(w.startswith("infeasible: placement group") for w in p.warnings)


def test_gang_and_plain_demand_share_new_nodes_without_double_counting():
    from strato.launcher.autoscaler import Demand

    p = plan(snap(CPU4, gangs=[gang("PACK", {"CPU": 2})], demand=[Demand({"CPU": 2}, 1)]))
    assert launched(p) == {"cpu4": 1}


def test_demand_from_head_splits_gangs_from_shapes():
    shapes, gangs = demand_from_head([
        {"shape": {"CPU": 1}, "count": 3, "infeasible": False},
        {"shape": {}, "count": 1, "infeasible": True, "bundles": [{"GPU": 1}, {"GPU": 1}],
         "strategy": "STRICT_SPREAD"},
    ])
    assert [(dict(d.shape), d.count) for d in shapes] == [({"CPU": 1}, 3)]
    assert gangs == [GangDemand(({"GPU": 1}, {"GPU": 1}), "STRICT_SPREAD")]
