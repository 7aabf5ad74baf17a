"""Pure unit tests of the autoscaler decision: plain data in, a Plan out, no processes."""

from __future__ import annotations

import pytest

from strato.launcher.autoscaler import (
    ALLOWED,
    Demand,
    NodeInfo,
    NodeState,
    NodeTypeInfo,
    Plan,
    Snapshot,
    TypeBackoff,
    check_transition,
    clear_backoff,
    next_zone,
    plan,
    record_capacity_failure,
)
from strato.launcher.autoscaler.options import backoff_delay

NOW = 10_000.0
CPU4 = NodeTypeInfo("cpu4", {"CPU": 4})
CPU16 = NodeTypeInfo("cpu16", {"CPU": 16})
GPU1 = NodeTypeInfo("gpu1", {"CPU": 8, "GPU": 1})
HEAD_TYPE = NodeTypeInfo("head", {"CPU": 2}, max_workers=0)
HEAD = NodeInfo("head-0", "head", kind="head", available={"CPU": 0})


def types(*infos: NodeTypeInfo) -> dict[str, NodeTypeInfo]:
    return {i.name: i for i in (HEAD_TYPE, *infos)}


def snap(*infos: NodeTypeInfo, nodes=(), demand=(), **kw) -> Snapshot:
    kw.setdefault("upscaling_speed", 1000.0)
    return Snapshot(NOW, types(*infos), nodes=[HEAD, *nodes], demand=list(demand), **kw)


def launched(p: Plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in p.launch:
        out[a.node_type] = out.get(a.node_type, 0) + a.count
    return out


def terminated(p: Plan) -> set[str]:
    return {a.node_id for a in p.terminate}


def every_action_has_reason(p: Plan) -> bool:
    actions = [*p.launch, *p.terminate, *p.drain, *p.retry_setup]
    return all(a.reason.strip() for a in actions)


def idle(node_id: str, t: str = "cpu4", since: float = 0.0, **kw) -> NodeInfo:
    return NodeInfo(node_id, t, idle_since=since, **kw)


# --- scale up -----------------------------------------------------------------------


def test_mixed_cpu_gpu_demand_goes_to_matching_types():
    p = plan(snap(CPU4, GPU1, demand=[Demand({"CPU": 1}, 8), Demand({"GPU": 1}, 2)]))
    assert launched(p) == {"cpu4": 2, "gpu1": 2}
    assert all(a.reason.startswith("demand") for a in p.launch)
    assert every_action_has_reason(p)


def test_cpu_demand_never_uses_gpu_type_while_cpu_type_fits_even_if_cheaper():
    cheap_gpu = NodeTypeInfo("gpu1", {"CPU": 8, "GPU": 1}, cost_rank=0.1)
    assert plan(snap(CPU4, cheap_gpu, demand=[Demand({"CPU": 1}, 4)])).launch[0].node_type == (
        "cpu4"
    )
    capped_cpu = NodeTypeInfo("cpu4", {"CPU": 4}, max_workers=0)
    p = plan(snap(capped_cpu, GPU1, demand=[Demand({"CPU": 1}, 4)]))
    assert p.launch == []
    assert any(w.startswith("waiting: 4 x {CPU: 1}") for w in p.warnings)


def test_cpu_demand_not_packed_onto_gpu_nodes_free_cpus():
    gpu_node = NodeInfo("g1", "gpu1", available={"CPU": 8, "GPU": 1}, idle_since=NOW - 1)
    p = plan(snap(CPU4, GPU1, nodes=[gpu_node], demand=[Demand({"CPU": 1}, 4)]))
    assert launched(p) == {"cpu4": 1}


def test_gpu_type_used_for_cpu_demand_only_when_no_cpu_type_fits():
    p = plan(snap(CPU4, GPU1, demand=[Demand({"CPU": 6})]))
    assert launched(p) == {"gpu1": 1}


def test_cheapest_fitting_type_first():
    assert launched(plan(snap(CPU16, CPU4, demand=[Demand({"CPU": 1})]))) == {"cpu4": 1}
    pricey = NodeTypeInfo("cpu4", {"CPU": 4}, cost_rank=100)
    assert launched(plan(snap(CPU16, pricey, demand=[Demand({"CPU": 1})]))) == {"cpu16": 1}


def test_100_one_cpu_tasks_on_4_cpu_type_launch_25():
    p = plan(snap(CPU4, demand=[Demand({"CPU": 1}, 100)]))
    assert p.launch[0].count == 25 and launched(p) == {"cpu4": 25}
    assert "100 x {CPU: 1}" in p.launch[0].reason


def test_per_type_max_workers_caps_and_warns():
    capped = NodeTypeInfo("cpu4", {"CPU": 4}, max_workers=10)
    p = plan(
        snap(
            capped,
            nodes=[NodeInfo("w1", "cpu4", available={"CPU": 0})],
            demand=[Demand({"CPU": 1}, 100)],
        )
    )
    assert launched(p) == {"cpu4": 9}
    assert any("cpu4 at max_workers 10" in w for w in p.warnings)


def test_capped_type_overflows_to_next_cheapest():
    capped = NodeTypeInfo("cpu4", {"CPU": 4}, max_workers=2)
    p = plan(snap(capped, CPU16, demand=[Demand({"CPU": 1}, 24)]))
    assert launched(p) == {"cpu4": 2, "cpu16": 1}


def test_global_max_workers():
    p = plan(
        snap(
            CPU4,
            GPU1,
            demand=[Demand({"CPU": 1}, 100), Demand({"GPU": 1}, 5)],
            max_workers=6,
            nodes=[NodeInfo("w1", "cpu4", available={"CPU": 0})],
        )
    )
    assert sum(launched(p).values()) == 5
    assert launched(p)["gpu1"] == 5  # scarce shapes are packed first
    assert any("global max_workers 6" in w for w in p.warnings)


def test_upscaling_speed_limits_pending_nodes_per_type():
    # Ray's rule: at most max(5, int(speed * max(running, 1))) pending per type.
    assert launched(plan(snap(CPU4, demand=[Demand({"CPU": 4}, 50)], upscaling_speed=1))) == {
        "cpu4": 5
    }
    running = [NodeInfo(f"w{i}", "cpu4", available={"CPU": 0}) for i in range(10)]
    pending = [NodeInfo("p0", "cpu4", state=NodeState.REQUESTED)]
    p = plan(
        snap(CPU4, nodes=running + pending, demand=[Demand({"CPU": 4}, 50)], upscaling_speed=2)
    )
    assert launched(p) == {"cpu4": 19}  # 2 * 10 = 20 pending allowed, 1 already pending
    assert any("upscaling_speed" in w for w in p.warnings)


def test_demand_fitting_existing_idle_capacity_launches_nothing():
    nodes = [idle("w1", since=NOW - 1), NodeInfo("w2", "cpu4", available={"CPU": 2})]
    p = plan(snap(CPU4, nodes=nodes, demand=[Demand({"CPU": 1}, 6)]))
    assert p.is_noop


def test_pending_nodes_count_as_capacity_across_ticks():
    first = plan(snap(CPU4, demand=[Demand({"CPU": 1}, 8)]))
    assert launched(first) == {"cpu4": 2}
    pending = [
        NodeInfo("p1", "cpu4", state=NodeState.REQUESTED),
        NodeInfo("p2", "cpu4", state=NodeState.SETTING_UP, available={}),
    ]
    assert plan(snap(CPU4, nodes=pending, demand=[Demand({"CPU": 1}, 8)])).launch == []
    more = plan(snap(CPU4, nodes=pending, demand=[Demand({"CPU": 1}, 9)]))
    assert launched(more) == {"cpu4": 1}


def test_infeasible_on_current_nodes_skips_registered_but_uses_pending():
    demand = [Demand({"CPU": 1}, 4, infeasible_on_current_nodes=True)]
    nodes = [idle("w1", since=NOW - 1)]
    assert launched(plan(snap(CPU4, nodes=nodes, demand=demand))) == {"cpu4": 1}
    nodes.append(NodeInfo("p1", "cpu4", state=NodeState.ALLOCATED))
    assert plan(snap(CPU4, nodes=nodes, demand=demand)).launch == []


def test_infeasible_shape_warns_and_launches_nothing():
    p = plan(snap(CPU4, GPU1, demand=[Demand({"GPU": 8}, 2)]))
    assert p.launch == []
    assert any(w.startswith("infeasible: {GPU: 8} fits no node type") for w in p.warnings)


def test_fractional_and_custom_resources_pack():
    tpu = NodeTypeInfo("acc", {"CPU": 4, "accelerator_type:A10G": 1, "GPU": 1})
    p = plan(snap(CPU4, tpu, demand=[Demand({"GPU": 0.25, "CPU": 1}, 4)]))
    assert launched(p) == {"acc": 1}
    assert "4 x {GPU: 0.25, CPU: 1}" in p.launch[0].reason


# --- min_workers --------------------------------------------------------------------


def test_min_workers_launched_without_demand_and_demand_packs_on_them():
    t = NodeTypeInfo("cpu4", {"CPU": 4}, min_workers=2)
    p = plan(snap(t))
    assert [(a.node_type, a.count) for a in p.launch] == [("cpu4", 2)]
    assert p.launch[0].reason.startswith("min_workers")
    assert launched(plan(snap(t, demand=[Demand({"CPU": 1}, 8)]))) == {"cpu4": 2}


def test_idle_never_scales_below_min_workers_and_keeps_most_recently_busy():
    t = NodeTypeInfo("cpu4", {"CPU": 4}, min_workers=2)
    nodes = [
        idle("old", since=NOW - 900),
        idle("mid", since=NOW - 800),
        idle("new", since=NOW - 700),
    ]
    p = plan(snap(t, nodes=nodes, idle_timeout_s=60))
    assert terminated(p) == {"old"}
    assert p.launch == []


# --- scale down ---------------------------------------------------------------------


def test_idle_timeout_with_fractional_minutes():
    timeout = 0.5 * 60  # idle_timeout_minutes: 0.5
    nodes = [idle("past", since=NOW - 31), idle("within", since=NOW - 29)]
    p = plan(snap(CPU4, nodes=nodes, idle_timeout_s=timeout))
    assert terminated(p) == {"past"}
    assert "idle 31s > idle timeout 30s" in p.terminate[0].reason


def test_busy_node_kept():
    p = plan(snap(CPU4, nodes=[NodeInfo("busy", "cpu4", idle_since=None)], idle_timeout_s=1))
    assert p.is_noop


def test_idle_node_that_receives_demand_is_kept():
    p = plan(snap(CPU4, nodes=[idle("w1")], demand=[Demand({"CPU": 1})], idle_timeout_s=1))
    assert p.is_noop


def test_nodes_with_actors_or_primary_objects_never_terminated():
    nodes = [
        idle("actor", has_actors=True),
        idle("objs", holds_primary_objects=True),
        idle("plain"),
    ]
    p = plan(snap(CPU4, nodes=nodes, idle_timeout_s=1))
    assert terminated(p) == {"plain"}
    assert sum(w.startswith("kept actor") for w in p.warnings) == 1
    assert any(w.startswith("kept objs") and "primary object" in w for w in p.warnings)


def test_outdated_launch_hash_terminated_when_idle_and_replaced_for_min():
    t = NodeTypeInfo("cpu4", {"CPU": 4}, min_workers=1)
    old_idle = idle("old", since=NOW - 1, launch_hash_current=False)
    p = plan(snap(t, nodes=[old_idle], idle_timeout_s=300))
    assert terminated(p) == {"old"} and "outdated launch hash" in p.terminate[0].reason
    assert launched(p) == {"cpu4": 1}
    old_busy = NodeInfo("busy", "cpu4", launch_hash_current=False)
    p = plan(snap(CPU4, nodes=[old_busy]))
    assert p.is_noop
    old_pending = NodeInfo("pend", "cpu4", state=NodeState.SETTING_UP, launch_hash_current=False)
    assert terminated(plan(snap(CPU4, nodes=[old_pending]))) == {"pend"}


def test_head_never_terminated():
    head = NodeInfo("head-0", "head", kind="head", idle_since=0.0, launch_hash_current=False)
    s = Snapshot(NOW, types(CPU4), nodes=[head], idle_timeout_s=1)
    assert plan(s).is_noop
    failed = NodeInfo("head-0", "head", kind="head", state=NodeState.SETUP_FAILED, setup_failures=9)
    p = plan(Snapshot(NOW, types(CPU4), nodes=[failed]))
    assert p.terminate == [] and any("head head-0" in w for w in p.warnings)


def test_head_free_capacity_is_used():
    head = NodeInfo("head-0", "head", kind="head", available={"CPU": 2})
    p = plan(Snapshot(NOW, types(CPU4), nodes=[head], demand=[Demand({"CPU": 1}, 2)]))
    assert p.launch == []


# --- preemption, backoff, setup failure ---------------------------------------------


def test_preempted_spot_node_replaced():
    spot = NodeTypeInfo("spot4", {"CPU": 4}, min_workers=1, spot=True, zones=("a", "b"))
    gone = NodeInfo("w-3", "spot4", state=NodeState.TERMINATED, preempted=True, spot=True)
    p = plan(snap(spot, nodes=[gone]))
    assert launched(p) == {"spot4": 1}
    assert p.launch[0].spot and "replace preempted node w-3" in p.launch[0].reason


def test_preemption_notice_drains_then_replacement_launched():
    spot = NodeTypeInfo("spot4", {"CPU": 4}, min_workers=1, spot=True)
    noticed = NodeInfo("w-4", "spot4", preempted=True, spot=True)
    p = plan(snap(spot, nodes=[noticed]))
    assert [d.node_id for d in p.drain] == ["w-4"]
    assert launched(p) == {"spot4": 1}
    drained = NodeInfo("w-4", "spot4", preempted=True, draining=True, idle_since=NOW - 1)
    assert terminated(plan(snap(spot, nodes=[drained]))) == {"w-4"}


def test_backoff_skips_zone_then_falls_back_to_on_demand():
    spot = NodeTypeInfo("g", {"GPU": 1}, spot=True, fallback_to_on_demand=True, zones=("a", "b"))
    assert next_zone(spot, [], NOW) == ("a", True)
    b1 = record_capacity_failure([], "g", "a", True, NOW)
    assert next_zone(spot, b1, NOW) == ("b", True)
    b2 = record_capacity_failure(b1, "g", "b", True, NOW)
    assert next_zone(spot, b2, NOW) == ("a", False)
    p = plan(snap(spot, demand=[Demand({"GPU": 1})], backoffs=b2))
    assert launched(p) == {"g": 1}
    assert p.launch[0].spot is False and "fallback to on-demand" in p.launch[0].reason
    b3 = record_capacity_failure(b2, "g", None, False, NOW)
    assert next_zone(spot, b3, NOW) is None
    p = plan(snap(spot, demand=[Demand({"GPU": 1})], backoffs=b3))
    assert p.launch == [] and any("backed off" in w for w in p.warnings)
    assert next_zone(spot, b3, NOW + backoff_delay(1)) == ("a", True)  # expired


def test_backed_off_spot_without_fallback_skipped_and_next_type_used():
    spot = NodeTypeInfo("spot4", {"CPU": 4}, spot=True, zones=("a",), cost_rank=1)
    backoffs = [TypeBackoff("spot4", "a", True, until=NOW + 5)]
    assert next_zone(spot, backoffs, NOW) is None
    p = plan(snap(spot, CPU4, demand=[Demand({"CPU": 1})], backoffs=backoffs))
    assert launched(p) == {"cpu4": 1}


def test_backoff_is_exponential_capped_and_cleared():
    b: list[TypeBackoff] = []
    delays = []
    for _ in range(7):
        b = record_capacity_failure(b, "g", "a", True, NOW)
        assert len(b) == 1
        delays.append(b[0].until - NOW)
    assert delays == [30, 60, 120, 240, 480, 600, 600]
    other = record_capacity_failure(b, "g", "b", True, NOW)
    assert clear_backoff(other, "g", "a", True) == [other[-1]]


def test_setup_failure_retried_then_terminated_and_replaced():
    t = NodeTypeInfo("cpu4", {"CPU": 4}, min_workers=1)
    failing = NodeInfo("w-5", "cpu4", state=NodeState.SETUP_FAILED, setup_failures=1)
    p = plan(snap(t, nodes=[failing]))
    assert [r.node_id for r in p.retry_setup] == ["w-5"] and p.launch == []
    waiting = NodeInfo(
        "w-5", "cpu4", state=NodeState.SETUP_FAILED, setup_failures=1, setup_retry_at=NOW + 10
    )
    assert plan(snap(t, nodes=[waiting])).is_noop
    dead = NodeInfo("w-5", "cpu4", state=NodeState.SETUP_FAILED, setup_failures=3)
    p = plan(snap(t, nodes=[dead]))
    assert terminated(p) == {"w-5"} and "setup failed 3 times" in p.terminate[0].reason
    assert launched(p) == {"cpu4": 1} and "node w-5 (setup failed 3 times)" in p.launch[0].reason
    assert every_action_has_reason(p)


def test_every_action_has_a_reason_in_a_busy_tick():
    spot = NodeTypeInfo("spot4", {"CPU": 4}, min_workers=1, spot=True)
    nodes = [
        idle("i1", since=0),
        idle("i2", "spot4", since=0, launch_hash_current=False),
        NodeInfo("p", "spot4", preempted=True),
        NodeInfo("f", "cpu4", state=NodeState.SETUP_FAILED, setup_failures=1),
    ]
    p = plan(
        snap(
            CPU4,
            GPU1,
            spot,
            nodes=nodes,
            idle_timeout_s=1,
            demand=[Demand({"GPU": 1}), Demand({"GPU": 64})],
        )
    )
    assert p.launch and p.terminate and p.drain and p.retry_setup and p.warnings
    assert every_action_has_reason(p)
    assert len(p.describe()) == (
        len(p.launch) + len(p.terminate) + len(p.drain) + len(p.retry_setup) + len(p.warnings)
    )


# --- lifecycle ----------------------------------------------------------------------


def test_lifecycle_table_covers_every_state_and_rejects_illegal_moves():
    assert set(ALLOWED) == set(NodeState)
    check_transition(NodeState.SETTING_UP, NodeState.SETUP_FAILED)
    check_transition(NodeState.SETUP_FAILED, NodeState.SETTING_UP)
    check_transition(NodeState.REQUESTED, NodeState.QUEUED)
    with pytest.raises(ValueError, match="terminated -> running"):
        check_transition(NodeState.TERMINATED, NodeState.RUNNING)
    with pytest.raises(ValueError, match="queued -> running"):
        check_transition(NodeState.QUEUED, NodeState.RUNNING)
