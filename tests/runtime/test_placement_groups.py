"""Placement groups: gang reservation on the head, tasks and actors inside bundles,
removal, the autoscaler's gang demand, and rescheduling as a whole after a node dies."""

from __future__ import annotations

import os

import pytest

from strato import exceptions as exc
from strato.runtime.head_client import HeadClient
from strato.util import placement_group, placement_group_table, remove_placement_group
from strato.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InGroup
from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(90)


def cpus(strato) -> float:
    return strato.available_resources().get("CPU", 0.0)


def test_group_reserved_then_tasks_and_actors_run_in_its_bundles(strato_local_fn):
    strato = strato_local_fn(num_cpus=3)
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    assert strato.get(pg.ready(), timeout=30) == pg
    assert placement_group_table(pg)["state"] == "CREATED"
    wait_until(lambda: cpus(strato) == 1.0, 10, 0.05, "2 of 3 CPUs reserved")

    @strato.remote
    def where():
        return os.getpid()

    @strato.remote(num_cpus=1)
    class Worker:
        def rank(self):
            return "ok"

    assert strato.get(where.options(scheduling_strategy=InGroup(pg, 0)).remote(), timeout=30)
    actors = [Worker.options(scheduling_strategy=InGroup(pg, i)).remote() for i in range(2)]
    assert strato.get([a.rank.remote() for a in actors], timeout=30) == ["ok", "ok"]
    # the bundles are the actors' resources: the third CPU stays free for everyone else
    assert cpus(strato) == 1.0

    with pytest.raises(ValueError, match="out of range"):
        where.options(scheduling_strategy=InGroup(pg, 2))
    with pytest.raises(ValueError, match="more than bundle 0"):
        where.options(num_cpus=2, scheduling_strategy=InGroup(pg, 0))

    remove_placement_group(pg)
    wait_until(lambda: cpus(strato) == 3.0, 10, 0.05, "the bundles given back")
    with pytest.raises(exc.ActorDiedError):
        strato.get(actors[0].rank.remote(), timeout=30)
    assert placement_group_table(pg)["state"] == "REMOVED"


def test_removing_a_group_fails_its_running_queued_and_waiting_tasks(strato_local_fn):
    """As in Ray, what uses a removed group's resources is stopped: a task running in
    it, one queued behind it, and one submitted after the removal all raise
    TaskCancelledError at once (none waits forever for a group that is gone)."""
    import time

    strato = strato_local_fn(num_cpus=2)
    pg = placement_group([{"CPU": 1}])
    assert strato.get(pg.ready(), timeout=30) == pg

    @strato.remote(num_cpus=1)
    def hold(started):
        open(started, "w").close()
        time.sleep(120)

    started = f"/tmp/strato-pg-started-{os.getpid()}"
    in_group = hold.options(scheduling_strategy=InGroup(pg, 0))
    running = in_group.remote(started)
    wait_until(lambda: os.path.exists(started), 30, 0.05, "the task in the group to start")
    queued = in_group.remote(started + "-2")      # waits for the busy bundle
    t0 = time.monotonic()
    remove_placement_group(pg)
    for ref in (running, queued):
        with pytest.raises(exc.TaskCancelledError):
            strato.get(ref, timeout=30)
    after = in_group.remote(started + "-3")        # the group is gone already
    with pytest.raises(exc.TaskCancelledError):
        strato.get(after, timeout=30)
    assert time.monotonic() - t0 < 20
    assert not os.path.exists(started + "-2") and not os.path.exists(started + "-3")
    os.unlink(started)
    wait_until(lambda: cpus(strato) == 2.0, 10, 0.05, "every CPU free again")


def test_a_node_refuses_bundles_it_no_longer_has_room_for(strato_local_fn, monkeypatch):
    """The head reserves from its view, which lags the nodes by a heartbeat: a node
    whose CPU a task took meanwhile refuses the bundle instead of running both, and the
    group is reserved once the CPU is free again."""
    import time

    monkeypatch.setenv("STRATO_HEARTBEAT_INTERVAL", "2")   # a view that lags on purpose
    strato = strato_local_fn(num_cpus=1)
    started = f"/tmp/strato-pg-busy-{os.getpid()}"

    @strato.remote(num_cpus=1)
    def busy(flag):
        open(flag, "w").close()
        time.sleep(4)
        os.unlink(flag)
        return "done"

    ref = busy.remote(started)
    wait_until(lambda: os.path.exists(started), 30, 0.01, "the task to take the CPU")
    pg = placement_group([{"CPU": 1}])        # the head still sees the CPU free
    ready = pg.ready()
    done, _ = strato.wait([ready], timeout=2)
    assert done == [] and os.path.exists(started)   # not reserved while the CPU is taken
    assert strato.get(ref, timeout=30) == "done"
    assert strato.get(ready, timeout=30) == pg       # reserved once it is free
    remove_placement_group(pg)


def test_group_is_all_or_nothing_and_pending_groups_are_gang_demand(strato_local_fn):
    strato = strato_local_fn(num_cpus=2)
    with pytest.raises(ValueError, match="strategy"):
        placement_group([{"CPU": 1}], strategy="CLOSE")
    with pytest.raises(ValueError, match="bundle 0"):
        placement_group([{"CPU": 0}])
    # one bundle would fit, the other never: nothing is reserved
    pg = placement_group([{"CPU": 1}, {"CPU": 1, "GPU": 1}], strategy="STRICT_SPREAD")
    assert not pg.wait(0.5)
    assert cpus(strato) == 2.0
    assert placement_group_table(pg)["state"] == "PENDING"
    demand = HeadClient().demand()
    gangs = [d for d in demand if d.get("bundles")]
    assert gangs == [{"shape": {}, "count": 1, "infeasible": True, "strategy": "STRICT_SPREAD",
                      "bundles": [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]}]

    # a task waiting for its group is not demand of its own
    @strato.remote(num_cpus=1)
    def inside():
        return 1

    ref = inside.options(scheduling_strategy=InGroup(pg, 0)).remote()
    assert strato.wait([ref], timeout=0.5) == ([], [ref])
    assert [d for d in HeadClient().demand() if not d.get("bundles")] == []
    remove_placement_group(pg)
    assert not [d for d in HeadClient().demand() if d.get("bundles")]


@pytest.mark.timeout(120)
def test_strict_spread_group_rescheduled_as_a_whole_after_node_death(multinode_fn):
    import strato

    cluster = multinode_fn

    @strato.remote(num_cpus=1, max_restarts=1)
    class Trainer:
        def __init__(self):
            self.calls = 0

        def where(self):
            self.calls += 1
            return strato.get_runtime_context().get_node_id(), os.getpid(), self.calls

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    strato.get(pg.ready(), timeout=30)
    table = placement_group_table(pg)
    nodes = set(table["bundles_to_node_id"].values())
    assert len(nodes) == 2
    trainers = [Trainer.options(scheduling_strategy=InGroup(pg, i)).remote() for i in range(2)]
    first = strato.get([t.where.remote() for t in trainers], timeout=30)
    assert {n for n, _, _ in first} == nodes
    victim = next(name for name in "CB" if cluster.node_id(name) in nodes)
    cluster.kill_node(victim)
    cluster.wait_node_dead(victim)

    def rescheduled():
        t = placement_group_table(pg)
        on = set(t["bundles_to_node_id"].values())
        return t["state"] == "CREATED" and cluster.node_id(victim) not in on and len(on) == 2

    wait_until(rescheduled, 30, 0.1, "the group reserved again on the two live nodes")

    def both_back():
        try:
            return strato.get([t.where.remote() for t in trainers], timeout=10)
        except (exc.ActorUnavailableError, exc.GetTimeoutError):
            return None

    after = wait_until(both_back, 45, 0.2, "both actors restarted in the group")
    alive = {cluster.node_id(n) for n in "ABC" if n != victim}
    assert {n for n, _, _ in after} == alive
    # both restarted, the survivor too: the group moved as a whole, fresh instances
    assert all(calls == 1 for _, _, calls in after)
    assert {p for _, p, _ in after}.isdisjoint({p for _, p, _ in first})
