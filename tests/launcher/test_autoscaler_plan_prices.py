"""plan() with prices: cheapest first by USD per hour, and GPU types' launch options
(instance type, zone, spot) walked in order past capacity backoffs."""

from __future__ import annotations

import pytest

from strato.catalog import LaunchOption
from strato.launcher.autoscaler import (
    Demand,
    NodeTypeInfo,
    Snapshot,
    next_option,
    next_zone,
    plan,
    record_capacity_failure,
)

pytestmark = pytest.mark.timeout(10)

OPTIONS = (
    LaunchOption("a", True, "g5.2xlarge", 0.44, "live"),
    LaunchOption("b", True, "g5.xlarge", 0.52, "live"),
    LaunchOption("a", False, "g5.xlarge", 1.006, "catalog"),
)


def gpu_type(**kw) -> NodeTypeInfo:
    return NodeTypeInfo(name="gpu", resources={"CPU": 8, "GPU": 1}, spot=True,
                        fallback_to_on_demand=True, max_workers=10, options=OPTIONS,
                        price_per_hour=0.44, **kw)


def test_price_orders_new_nodes_when_every_type_has_one() -> None:
    # by cost_rank (CPU + 20 x GPU) the 4-GPU type would lose; by price it wins
    cheap4 = NodeTypeInfo("four", {"CPU": 48, "GPU": 4}, max_workers=5, price_per_hour=1.0)
    dear1 = NodeTypeInfo("one", {"CPU": 4, "GPU": 1}, max_workers=5, price_per_hour=3.0)
    snap = Snapshot(now=0.0, node_types={"four": cheap4, "one": dear1},
                    demand=[Demand({"GPU": 1}, 1)], max_workers=10)
    assert [(a.node_type, a.count) for a in plan(snap).launch] == [("four", 1)]
    # one type without a price: the old rank for all
    unpriced = NodeTypeInfo("one", {"CPU": 4, "GPU": 1}, max_workers=5)
    snap = Snapshot(now=0.0, node_types={"four": cheap4, "one": unpriced},
                    demand=[Demand({"GPU": 1}, 1)], max_workers=10)
    assert [a.node_type for a in plan(snap).launch] == ["one"]


def test_options_are_walked_past_backoffs_then_on_demand() -> None:
    info = gpu_type()
    assert next_option(info, [], 0.0) == OPTIONS[0]
    b = record_capacity_failure([], "gpu", "a", True, 0.0, instance_type="g5.2xlarge")
    assert next_option(info, b, 1.0) == OPTIONS[1]  # the next cheapest type and zone
    assert next_zone(info, b, 1.0) == ("b", True)
    b = record_capacity_failure(b, "gpu", "b", True, 1.0, instance_type="g5.xlarge")
    assert next_option(info, b, 2.0) == OPTIONS[2]  # then on-demand
    b = record_capacity_failure(b, "gpu", "a", False, 2.0, instance_type="g5.xlarge")
    assert next_option(info, b, 3.0) is None
    assert next_option(info, b, 10_000.0) == OPTIONS[0]  # backoffs end


def test_launch_carries_the_option_chosen() -> None:
    b = record_capacity_failure([], "gpu", "a", True, 0.0, instance_type="g5.2xlarge")
    snap = Snapshot(now=1.0, node_types={"gpu": gpu_type(min_workers=1)}, backoffs=b)
    (launch,) = plan(snap).launch
    assert (launch.node_type, launch.spot, launch.instance_type) == ("gpu", True, "g5.xlarge")


def test_types_without_options_behave_as_before() -> None:
    info = NodeTypeInfo("cpu", {"CPU": 4}, spot=True, fallback_to_on_demand=True,
                        zones=("a", "b"))
    assert next_option(info, [], 0.0) == LaunchOption("a", True)
    b = record_capacity_failure([], "cpu", "a", True, 0.0)  # no instance type: all of them
    b = record_capacity_failure(b, "cpu", "b", True, 0.0)
    assert next_option(info, b, 1.0) == LaunchOption("a", False)
