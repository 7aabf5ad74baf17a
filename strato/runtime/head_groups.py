"""Placement groups on the head: bundles reserved all at once or not at all, given
back on removal, and rescheduled as a whole when one of their nodes dies.

A mixin of ``HeadService``, which owns the tables it reads (nodes, actors, groups)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from strato.runtime import messages as m
from strato.runtime import placement, scheduler
from strato.runtime.head_records import ActorRecord, NodeRecord
from strato.runtime.messages import ActorState


@dataclass
class GroupRecord:
    """A placement group: its bundles, where each is reserved (all or none), its state."""

    pg_id: bytes
    bundles: list
    strategy: str
    name: str = ""
    job_id: bytes | None = None
    detached: bool = False
    state: str = "PENDING"        # PENDING | CREATED | REMOVED
    nodes: list = field(default_factory=list)   # node_id per bundle once CREATED
    created: float = field(default_factory=time.time)

    def describe(self) -> dict:
        return {"placement_group_id": self.pg_id.hex(), "name": self.name,
                "strategy": self.strategy, "state": self.state,
                "bundles": {i: dict(b) for i, b in enumerate(self.bundles)},
                "bundles_to_node_id": {i: n.hex() for i, n in enumerate(self.nodes)}}


class PlacementGroups:
    """The head's placement-group calls (``rpc_*``) and the reservation they need.

    Uses the host's tables and ``views``, ``record_event``, ``broadcast_view``,
    ``kill_actor`` and ``place_pending_actors``."""

    nodes: dict[bytes, NodeRecord]
    actors: dict[bytes, ActorRecord]
    groups: dict[bytes, GroupRecord]

    def place_pending_groups(self) -> None:
        """Reserve each pending group's bundles, all of them at once or none (oldest
        group first)."""
        pending = [g for g in self.groups.values() if g.state == "PENDING"]
        if not pending:
            return
        views = self.views()
        for group in sorted(pending, key=lambda g: g.created):
            nodes = placement.place_bundles(group.bundles, group.strategy, views)
            if nodes is None:
                continue
            group.nodes = nodes
            group.state = "CREATED"
            pg_hex = group.pg_id.hex()
            per_node: dict[bytes, list] = {}
            for index, (node, shape) in enumerate(zip(nodes, group.bundles)):
                per_node.setdefault(node, []).append((index, shape))
                rec = self.nodes[node]
                # the head's copy now, the agent's from its next heartbeat
                scheduler.acquire(rec.available, shape)
                for name, amount in placement.bundle_resources(pg_hex, index, shape).items():
                    rec.total[name] = rec.total.get(name, 0.0) + amount
                    rec.available[name] = rec.available.get(name, 0.0) + amount
            for node, bundles in per_node.items():
                self.nodes[node].link.send((m.RESERVE_BUNDLES, group.pg_id, bundles))
            self.record_event("placement-group", None, f"{pg_hex[:8]} ({group.strategy}, "
                              f"{len(nodes)} bundles) reserved on "
                              f"{len(per_node)} node(s)")
            views = self.views()
        self.broadcast_view()

    def release_group(self, group: GroupRecord) -> None:
        """Give a created group's bundles back on the nodes still alive."""
        tail = "_" + group.pg_id.hex()
        for node in set(group.nodes):
            rec = self.nodes.get(node)
            if rec is None or not rec.alive:
                continue
            for index, n in enumerate(group.nodes):
                if n == node:
                    scheduler.release(rec.available, group.bundles[index])
            for name in [k for k in rec.total if placement.is_group_resource(k)
                         and k.endswith(tail)]:
                del rec.total[name]
                rec.available.pop(name, None)
            rec.link.send((m.RELEASE_BUNDLES, group.pg_id))
        group.nodes = []

    def group_actors(self, group: GroupRecord) -> list[bytes]:
        tail = "_" + group.pg_id.hex()
        return [a for a, r in self.actors.items() if r.state != ActorState.DEAD
                and any(k.endswith(tail) and placement.is_group_resource(k)
                        for k in r.spec.resources)]

    def _m_reserve_refused(self, link, msg) -> None:
        """A node had no room for its bundles when they arrived (the head's view of it
        lagged): the group goes back to pending, reserved again at a later tick."""
        _, pg_id, node_id = msg
        group = self.groups.get(pg_id)
        if group is not None and group.state == "CREATED" and node_id in group.nodes:
            shapes = [b for n, b in zip(group.nodes, group.bundles) if n == node_id]
            self.reschedule_group(group, f"node {node_id.hex()[:8]} had no room for its "
                                         "bundles any more")
            rec = self.nodes.get(node_id)
            if rec is not None:   # until its next heartbeat, count that room as taken
                for shape in shapes:
                    for name in shape:
                        rec.available[name] = 0.0

    def reschedule_group(self, group: GroupRecord, reason: str) -> None:
        """One of the group's nodes is gone: the whole group goes back to pending (its
        bundles elsewhere are given back) and its actors restart per max_restarts."""
        self.record_event("placement-group", None,
                          f"{group.pg_id.hex()[:8]} rescheduled as a whole: {reason}")
        self.release_group(group)
        group.state = "PENDING"
        for actor_id in self.group_actors(group):
            rec = self.actors[actor_id]
            if rec.state == ActorState.ALIVE and rec.node is not None:
                self.kill_actor(actor_id, no_restart=False,
                                reason=f"its placement group was rescheduled ({reason})")

    def rpc_create_placement_group(self, pg_id: bytes, bundles: list, strategy: str,
                                   name: str = "", job_id: bytes | None = None,
                                   detached: bool = False) -> None:
        if strategy not in placement.STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}; one of "
                             f"{', '.join(placement.STRATEGIES)}")
        self.groups[pg_id] = GroupRecord(pg_id, [dict(b) for b in bundles], strategy, name,
                                         job_id, detached)
        self.place_pending_groups()
        self.place_pending_actors()

    def rpc_remove_placement_group(self, pg_id: bytes) -> bool:
        """Give the bundles back, kill the group's actors (no restart) and have every
        node fail the group's tasks."""
        group = self.groups.get(pg_id)
        if group is None or group.state == "REMOVED":
            return False
        if group.state == "CREATED":
            self.release_group(group)
        group.state = "REMOVED"
        for actor_id in self.group_actors(group):
            self.kill_actor(actor_id, no_restart=True, reason="its placement group was removed")
        for rec in self.nodes.values():   # its tasks, wherever they wait or run, fail
            if rec.alive:
                rec.link.send((m.PG_REMOVED, pg_id))
        self.broadcast_view()
        return True

    def rpc_placement_group_table(self, pg_id: bytes | None = None):
        if pg_id is not None:
            group = self.groups.get(pg_id)
            return None if group is None else group.describe()
        return {g.pg_id.hex(): g.describe() for g in self.groups.values()}

    def rpc_get_placement_group(self, name: str):
        for group in self.groups.values():
            if group.name == name and group.state != "REMOVED":
                return group.pg_id, group.bundles, group.strategy
        raise ValueError(f"no placement group named {name!r}")
