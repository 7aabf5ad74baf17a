"""The head service: node table and heartbeats, actor directory (named, detached,
restarts), jobs, checkpoints, drains, and the cluster demand the autoscaler reads.

Messages from agents are routed by ``ROUTES`` (kind -> handler); RPCs (``RPC``) call
the ``rpc_<method>`` of this class."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from strato.exceptions import ActorDiedError
from strato.runtime import messages as m
from strato.runtime import placement, scheduler
from strato.runtime.bounded import BoundedSet
from strato.runtime.head_checkpoints import Checkpoints
from strato.runtime.head_groups import GroupRecord, PlacementGroups
from strato.runtime.head_records import ActorRecord, NodeRecord
from strato.runtime.messages import ActorState
from strato.runtime.serialization import serialize

log = logging.getLogger("strato.head")

DEAD_NODE_IDS_KEPT = 10_000
DEAD_NODES_KEPT = 100
DEAD_ACTORS_KEPT = 200
FINISHED_JOBS_KEPT = 1000
TICK_S = 0.2           # how often the head checks heartbeats and places pending work


class HeadService(PlacementGroups, Checkpoints):
    def __init__(self, *, heartbeat_timeout: float = 5.0, view_interval: float = 0.2,
                 storage_dir: str | None = None, store=None, resume_grace: float = 10.0):
        self.storage_dir = storage_dir
        # the tables on disk (``head_store.HeadStore``), so a restarted head resumes
        self.store = store
        self.resume_grace = resume_grace
        self._unclaimed: set[bytes] = set()   # restored actors no node has claimed yet
        self._resume_deadline = 0.0
        self._last_tick = time.time()
        self._last_view = 0.0
        self.local_node: bytes | None = None   # the node in the head's own process
        self.events: list[dict] = []
        self.nodes: dict[bytes, NodeRecord] = {}
        self.actors: dict[bytes, ActorRecord] = {}
        self.named: dict[tuple[str, str], bytes] = {}
        self.jobs: dict[bytes, dict] = {}
        self.heartbeat_timeout = heartbeat_timeout
        self.view_interval = view_interval
        # bounded, so a cluster that lives for weeks stays flat: the ids of dead nodes
        # (the last 10k), dead nodes' records (the last 100, for `strato status`), dead
        # actors (the last 200) and finished jobs (the last 1000)
        self.dead = BoundedSet(maxlen=DEAD_NODE_IDS_KEPT)
        self._dead_records: deque = deque()
        self._dead_actors: deque = deque()
        self._finished_jobs: deque = deque()
        self.pending_actors: list[bytes] = []
        self.groups: dict[bytes, GroupRecord] = {}   # placement groups, by id
        self._task: asyncio.Task | None = None
        self.started = time.time()
        # callables adding counts to ``activity`` (the head node's agent: client
        # sessions, durable calls); in-process, as the head and that agent share one
        self.activity_sources: list = []
        self.last_active = self.started

    async def start(self) -> None:
        if self.store is not None:
            self._restore()
        self._task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    # ------------------------------------------------------------------ persistence
    _SAVED = ("meta", "blob", "restarts_left", "name", "namespace", "detached", "node")

    def _persist_actor(self, actor_id: bytes) -> None:
        rec = self.actors.get(actor_id)
        if self.store is None or rec is None:
            return
        if rec.state == ActorState.DEAD:
            self.store.drop_actor(actor_id)
        else:
            self.store.save_actor(actor_id, {"spec": rec.spec,
                                             **{k: getattr(rec, k) for k in self._SAVED}})

    def _restore(self) -> None:
        """A head restarting on its own disk: actors that were not dead come back as
        RESTARTING until the node hosting them re-registers and claims them; those no
        node claims within ``resume_grace`` restart elsewhere or die."""
        saved = self.store.actors()
        for actor_id, fields in saved.items():
            rec = ActorRecord(fields["spec"], fields["meta"], fields["blob"],
                              state=ActorState.RESTARTING,
                              restarts_left=fields["restarts_left"], name=fields["name"],
                              namespace=fields["namespace"], detached=fields["detached"])
            self.actors[actor_id] = rec
            if rec.name:
                self.named[(rec.namespace, rec.name)] = actor_id
            self._unclaimed.add(actor_id)
        self._resume_deadline = time.time() + self.resume_grace
        if saved:
            log.info("resumed %d actor(s) from %s; waiting %.0fs for their nodes",
                     len(saved), self.store.path, self.resume_grace)
            self.record_event("head-resumed", None, f"{len(saved)} actor(s) restored")

    def _claim_actors(self, node_id: bytes, link, hosted: list) -> None:
        """A node (re-)registered hosting ``hosted``: those the head knows are alive
        there; one it does not know (dead meanwhile) is stopped."""
        for actor_id in hosted:
            rec = self.actors.get(actor_id)
            if rec is None or rec.state == ActorState.DEAD:
                link.send((m.STOP_ACTOR, actor_id, True))
                continue
            self._unclaimed.discard(actor_id)
            rec.state = ActorState.ALIVE
            rec.node = node_id
            self._broadcast_actor(actor_id)

    def _expire_unclaimed(self) -> None:
        if not self._unclaimed or time.time() < self._resume_deadline:
            return
        for actor_id in list(self._unclaimed):
            self._unclaimed.discard(actor_id)
            rec = self.actors.get(actor_id)
            if rec is not None and rec.state == ActorState.RESTARTING and rec.node is None:
                self._actor_died(actor_id, rec, serialize(ActorDiedError(
                    f"actor {rec.spec.name} was lost with its node while the head was "
                    "down")).to_bytes())

    async def _tick_loop(self) -> None:
        # heartbeats and pending actors and groups are looked at every TICK_S even when
        # the view goes out less often (STRATO_VIEW_INTERVAL_S only spaces the views)
        while True:
            await asyncio.sleep(min(TICK_S, self.view_interval))
            try:
                self._tick()
            except Exception:
                log.exception("head tick failed")

    def _tick(self) -> None:
        now = time.time()
        stalled = now - self._last_tick > self.heartbeat_timeout / 2
        self._last_tick = now
        for rec in list(self.nodes.values()):
            if stalled:
                # the head's own loop stalled (GC pause, a slow disk): heartbeats wait
                # unread in its sockets; nobody is declared dead for the head's pause
                rec.last_heartbeat = max(rec.last_heartbeat, now)
            elif rec.alive and now - rec.last_heartbeat > self.heartbeat_timeout:
                self.mark_dead(rec.node_id, "missed heartbeats")
        self._expire_unclaimed()
        self.place_pending_groups()
        self.place_pending_actors()
        if now - self._last_view >= self.view_interval * 0.99:
            self._last_view = now
            self.broadcast_view()
        if self._active(self.activity_counts()):
            self.last_active = now

    def views(self) -> list[scheduler.NodeView]:
        return [scheduler.NodeView(r.node_id, r.total, r.available, r.alive, r.draining)
                for r in self.nodes.values() if r.alive]

    def view_message(self, full: bool = False) -> tuple:
        """Live nodes' resources and addresses for peer links; with ``full`` (a node that
        registers) the dead node ids too, which others learn one NODE_DEAD at a time."""
        addresses = {r.node_id: r.address for r in self.nodes.values() if r.alive}
        return (m.VIEW, self.views(), list(self.dead) if full else None, addresses)

    def broadcast_view(self) -> None:
        msg = self.view_message()
        for rec in self.nodes.values():
            if rec.alive:
                rec.link.send(msg)

    # ------------------------------------------------------------------ messages
    def handle(self, link, msg) -> None:
        handler = ROUTES.get(msg[0])
        if handler is None:
            log.warning("ignored a %r message: the head does not take it", msg[0])
            return
        handler(self, link, msg)

    def link_closed(self, node_id: bytes | None) -> None:
        if node_id is not None and node_id in self.nodes and self.nodes[node_id].alive:
            self.mark_dead(node_id, "connection lost")

    def _m_register(self, link, msg) -> None:
        _, node_id, address, total, labels, *rest = msg
        self.nodes[node_id] = NodeRecord(node_id, address, dict(total), dict(total), labels, link)
        if rest and rest[0]:   # a node that outlived a head restart: the actors it hosts
            self._claim_actors(node_id, link, rest[0])
        self.dead.discard(node_id)
        log.info("node %s joined at %s with %s", node_id.hex()[:8], address, total)
        link.send(self.view_message(full=True))
        for actor_id, rec in self.actors.items():
            link.send((m.ACTOR_UPDATE, actor_id, rec.state, rec.node, rec.error))
        self.place_pending_groups()
        self.place_pending_actors()
        self.broadcast_view()

    def _m_heartbeat(self, link, msg) -> None:
        _, node_id, available, idle_since, demand, store_used, num_actors = msg
        rec = self.nodes.get(node_id)
        if rec is not None and not rec.alive and node_id != self.local_node:
            # it stalled past the timeout (GC pause, long spill) and woke up: its tasks were
            # failed over and its objects rebuilt already, so it must not live on unseen
            link.send((m.EXIT, f"the head declared this node dead ({rec.dead_reason}) "
                               "and it woke up later"))
            return
        if rec is None:
            if node_id in self.dead:   # its record was pruned: still a zombie
                link.send((m.EXIT, "the head declared this node dead long ago"))
            return
        rec.last_heartbeat = time.time()
        rec.available = available
        rec.idle_since = idle_since
        rec.demand = demand
        rec.store_used = store_used
        rec.num_actors = num_actors

    def _m_preemption_notice(self, link, msg) -> None:
        _, node_id, text = msg
        rec = self.nodes.get(node_id)
        if rec is None:
            return
        self.record_event("preemption-notice", node_id, text)
        self.rpc_drain_node(node_id.hex(), f"spot preemption notice: {text}")

    def record_event(self, kind: str, node_id: bytes | None, detail: str) -> None:
        self.events.append({"time": time.time(), "kind": kind,
                            "node": node_id.hex() if node_id else None, "detail": detail})
        del self.events[:-200]

    def _m_job_started(self, link, msg) -> None:
        _, job_id, node_id = msg
        self.jobs[job_id] = {"node": node_id, "start": time.time(), "end": None}

    def _m_job_finished(self, link, msg) -> None:
        _, job_id = msg
        if job_id in self.jobs and self.jobs[job_id]["end"] is None:
            self.jobs[job_id]["end"] = time.time()
            self._finished_jobs.append(job_id)
            while len(self._finished_jobs) > FINISHED_JOBS_KEPT:
                self.jobs.pop(self._finished_jobs.popleft(), None)
        for actor_id, rec in list(self.actors.items()):
            if rec.spec.job_id == job_id and not rec.detached and rec.state != ActorState.DEAD:
                self.kill_actor(actor_id, no_restart=True, reason="its driver exited")
        for group in list(self.groups.values()):
            if group.job_id == job_id and not group.detached:
                self.rpc_remove_placement_group(group.pg_id)

    def _m_actor_register(self, link, msg) -> None:
        _, spec, meta, blob = msg
        opts = spec.actor_options or {}
        rec = ActorRecord(spec, meta, blob, restarts_left=opts.get("max_restarts", 0),
                          name=opts.get("name"), namespace=opts.get("namespace") or "",
                          detached=opts.get("lifetime") == "detached")
        if rec.name:
            key = (rec.namespace, rec.name)
            if key in self.named and self.actors[self.named[key]].state != ActorState.DEAD:
                # the api checked before; a race keeps the first
                rec.state = ActorState.DEAD
                rec.error = serialize(ValueError(
                    f"an actor named {rec.name!r} already exists in namespace "
                    f"{rec.namespace!r}")).to_bytes()
                self.actors[spec.actor_id] = rec
                self._broadcast_actor(spec.actor_id)
                return
            self.named[key] = spec.actor_id
        self.actors[spec.actor_id] = rec
        self.pending_actors.append(spec.actor_id)
        self._persist_actor(spec.actor_id)
        self.place_pending_actors()

    def place_pending_actors(self) -> None:
        if not self.pending_actors:
            return
        still = []
        views = self.views()
        for actor_id in self.pending_actors:
            rec = self.actors.get(actor_id)
            if rec is None or rec.state == ActorState.DEAD:
                continue
            where, node = scheduler.place(rec.spec.resources, None, views)
            if where != scheduler.REMOTE:
                still.append(actor_id)
                continue
            target = self.nodes[node]
            scheduler.acquire(target.available, rec.spec.resources)
            rec.node = node
            target.link.send((m.CREATE_ACTOR, rec.spec, rec.blob))
        self.pending_actors = still

    def _m_actor_state(self, link, msg) -> None:
        _, actor_id, state, node, err = msg
        rec = self.actors.get(actor_id)
        if rec is None:
            return
        if state == ActorState.ALIVE:
            rec.state = ActorState.ALIVE
            rec.node = node
        elif state == ActorState.FAILED:
            rec.state = ActorState.DEAD
            rec.error = err
            rec.restarts_left = 0
            self._release_name(rec)
        elif state == ActorState.DEAD:
            if rec.state == ActorState.DEAD:
                return
            self._actor_died(actor_id, rec, err)
            return
        self._broadcast_actor(actor_id)

    def _actor_died(self, actor_id: bytes, rec: ActorRecord, err: bytes | None) -> None:
        if rec.restarts_left != 0:
            if rec.restarts_left > 0:
                rec.restarts_left -= 1
            rec.state = ActorState.RESTARTING
            rec.node = None
            rec.spec.attempt += 1
            self.pending_actors.append(actor_id)
            self._broadcast_actor(actor_id)
            self.place_pending_actors()
            return
        rec.state = ActorState.DEAD
        rec.error = err
        self._release_name(rec)
        self._broadcast_actor(actor_id)

    def _release_name(self, rec: ActorRecord) -> None:
        if rec.name and self.named.get((rec.namespace, rec.name)) == rec.spec.actor_id:
            del self.named[(rec.namespace, rec.name)]

    def _broadcast_actor(self, actor_id: bytes) -> None:
        self._persist_actor(actor_id)
        rec = self.actors[actor_id]
        if rec.state == ActorState.DEAD:
            self._dead_actors.append(actor_id)
            while len(self._dead_actors) > DEAD_ACTORS_KEPT:
                old = self._dead_actors.popleft()
                if old != actor_id and old in self.actors \
                        and self.actors[old].state == ActorState.DEAD:
                    del self.actors[old]
        for node in self.nodes.values():
            if node.alive:
                node.link.send((m.ACTOR_UPDATE, actor_id, rec.state, rec.node, rec.error))

    def _m_actor_watch(self, link, msg) -> None:
        _, actor_id, _node = msg
        rec = self.actors.get(actor_id)
        if rec is not None:
            link.send((m.ACTOR_UPDATE, actor_id, rec.state, rec.node, rec.error))
        else:   # died long ago (its record was pruned), or never registered here
            link.send((m.ACTOR_UPDATE, actor_id, ActorState.DEAD, None, serialize(
                ActorDiedError(f"actor {actor_id.hex()[:8]} is dead (the head no longer "
                               "keeps its record)")).to_bytes()))

    def _m_kill_actor(self, link, msg) -> None:
        _, actor_id, no_restart = msg
        self.kill_actor(actor_id, no_restart=no_restart, reason="killed with strato.kill")

    def kill_actor(self, actor_id: bytes, no_restart: bool, reason: str) -> None:
        rec = self.actors.get(actor_id)
        if rec is None:
            return
        if no_restart:
            rec.restarts_left = 0
        if rec.state in (ActorState.PENDING, ActorState.RESTARTING) and rec.node is None:
            rec.state = ActorState.DEAD
            rec.error = serialize(ActorDiedError(f"actor {rec.spec.name} {reason}")).to_bytes()
            self._release_name(rec)
            self._broadcast_actor(actor_id)
            return
        if no_restart:
            rec.error = serialize(ActorDiedError(f"actor {rec.spec.name} {reason}")).to_bytes()
        node = self.nodes.get(rec.node)
        if node is not None and node.alive:
            node.link.send((m.STOP_ACTOR, actor_id, rec.restarts_left == 0))

    def mark_dead(self, node_id: bytes, reason: str) -> None:
        rec = self.nodes.get(node_id)
        if rec is None or not rec.alive:
            return
        log.warning("node %s is dead: %s", node_id.hex()[:8], reason)
        self.record_event("node-dead", node_id, reason)
        rec.alive = False
        rec.dead_reason = reason
        self.dead.add(node_id)
        self._dead_records.append(node_id)
        while len(self._dead_records) > DEAD_NODES_KEPT:
            old = self._dead_records.popleft()
            if old in self.nodes and not self.nodes[old].alive:
                del self.nodes[old]
        for other in self.nodes.values():
            if other.alive:
                other.link.send((m.NODE_DEAD, node_id))
        for actor_id, arec in list(self.actors.items()):
            if arec.node == node_id and arec.state != ActorState.DEAD:
                err = serialize(ActorDiedError(
                    f"actor {arec.spec.name} died with node {node_id.hex()[:8]} ({reason})")).to_bytes()
                self._actor_died(actor_id, arec, err)
        for group in self.groups.values():
            if group.state == "CREATED" and node_id in group.nodes:
                self.reschedule_group(group, f"node {node_id.hex()[:8]} died ({reason})")
        self.broadcast_view()

    # ------------------------------------------------------------------ placement groups
    # ------------------------------------------------------------------ rpc
    def _m_rpc(self, link, msg) -> None:
        _, rid, method, args = msg
        try:
            value = getattr(self, "rpc_" + method)(*args)
            link.send((m.RPC_REPLY, rid, True, value))
        except Exception as exc:
            link.send((m.RPC_REPLY, rid, False, exc))

    def rpc_nodes(self) -> list[dict]:
        """Every node the head knows, dead ones too, in the one node schema."""
        now = time.time()
        return [r.describe(now) for r in self.nodes.values()]

    def rpc_cluster_resources(self) -> dict:
        out: dict[str, float] = {}
        for r in self.nodes.values():
            if r.alive:
                for k, v in r.total.items():
                    out[k] = out.get(k, 0.0) + v
        return out

    def rpc_available_resources(self) -> dict:
        out: dict[str, float] = {}
        for r in self.nodes.values():
            if r.alive and not r.draining:
                for k, v in r.available.items():
                    if v > 1e-9:
                        out[k] = out.get(k, 0.0) + v
        return out

    def activity_counts(self) -> dict:
        """What runs now: jobs (drivers, client sessions), actors, nodes using resources,
        pending work, and what ``activity_sources`` add (sessions, durable calls)."""
        counts = {
            "jobs": sum(1 for j in self.jobs.values() if j["end"] is None),
            "actors": sum(1 for a in self.actors.values() if a.state != ActorState.DEAD),
            "busy_nodes": sum(1 for r in self.nodes.values() if r.alive and any(
                r.available.get(k, 0.0) < v - 1e-9 for k, v in r.total.items())),
            "pending": sum(c for r in self.nodes.values() if r.alive for _, c, _ in r.demand)
            + len(self.pending_actors)
            + sum(1 for g in self.groups.values() if g.state == "PENDING"),
        }
        for source in self.activity_sources:
            counts.update(source())
        return counts

    @staticmethod
    def _active(counts: dict) -> bool:
        return any(v for k, v in counts.items() if k != "durable_kept")

    def rpc_activity(self) -> dict:
        """Whether anything is active on the cluster and since when nothing was: the
        counts of ``activity_counts``, ``active``, ``last_active`` (epoch seconds) and
        ``idle_seconds``. Results of durable calls kept for later are not activity."""
        counts = self.activity_counts()
        now = time.time()
        active = self._active(counts)
        if active:
            self.last_active = now
        return {**counts, "active": active, "last_active": self.last_active,
                "idle_seconds": 0.0 if active else now - self.last_active}

    def rpc_demand(self) -> list[dict]:
        """What the autoscaler reads: pending shapes (tasks and actors) with counts, and
        each pending placement group as one gang: ``{"bundles": [shape], "strategy"}``
        (with ``"shape": {}``, ``"count": 1``). Tasks and actors inside a group are not
        demand of their own: their group is."""
        shapes: dict[tuple, list] = {}
        for r in self.nodes.values():
            if not r.alive:
                continue
            for shape, count, infeasible in r.demand:
                if placement.is_group_shape(shape):
                    continue
                key = tuple(sorted(shape.items()))
                entry = shapes.setdefault(key, [dict(shape), 0, False])
                entry[1] += count
                entry[2] = entry[2] or infeasible
        views = self.views()
        for actor_id in self.pending_actors:
            rec = self.actors.get(actor_id)
            if rec is None or rec.state == ActorState.DEAD \
                    or placement.is_group_shape(rec.spec.resources):
                continue
            key = tuple(sorted(rec.spec.resources.items()))
            where, _ = scheduler.place(rec.spec.resources, None, views)
            entry = shapes.setdefault(key, [dict(rec.spec.resources), 0, False])
            entry[1] += 1
            entry[2] = entry[2] or where == scheduler.INFEASIBLE
        out = [{"shape": s, "count": c, "infeasible": i} for s, c, i in shapes.values()]
        for group in self.groups.values():
            if group.state == "PENDING":
                out.append({"shape": {}, "count": 1, "infeasible": True,
                            "bundles": [dict(b) for b in group.bundles],
                            "strategy": group.strategy})
        return out

    def rpc_drain_node(self, node_hex: str, reason: str = "drain requested") -> bool:
        """Stop placing work on a node (spot notice); actors get a checkpoint call."""
        rec = self._node_by_hex(node_hex)
        if rec.draining:
            return True
        rec.draining = True
        rec.drain_reason = reason
        self.record_event("drain", rec.node_id, reason)
        rec.link.send((m.DRAIN,))
        for actor_id, arec in self.actors.items():
            if arec.node == rec.node_id and arec.state == ActorState.ALIVE:
                rec.link.send((m.ACTOR_CHECKPOINT, actor_id))
        self.broadcast_view()
        return True

    def _node_by_hex(self, node_hex: str) -> NodeRecord:
        for r in self.nodes.values():
            if r.node_id.hex() == node_hex or r.node_id.hex().startswith(node_hex):
                return r
        raise KeyError(f"no node {node_hex}")

    def rpc_get_actor(self, name: str, namespace: str):
        actor_id = self.named.get((namespace, name))
        if actor_id is None:
            raise ValueError(f"no actor named {name!r} in namespace {namespace!r}")
        rec = self.actors[actor_id]
        return actor_id, rec.meta, rec.spec.owner_node

    def rpc_list_actors(self) -> list[dict]:
        return [{"actor_id": a.hex(), "name": r.name, "state": r.state,
                 "node": r.node.hex() if r.node else None, "class": r.spec.name}
                for a, r in self.actors.items()]

    def rpc_actor_state(self, actor_id: bytes):
        rec = self.actors.get(actor_id)
        return None if rec is None else rec.state

    def rpc_events(self) -> list[dict]:
        return list(self.events)



# kind -> handler, for what agents send the head
ROUTES = {
    m.REGISTER: HeadService._m_register,
    m.HEARTBEAT: HeadService._m_heartbeat,
    m.PREEMPTION_NOTICE: HeadService._m_preemption_notice,
    m.JOB_STARTED: HeadService._m_job_started,
    m.JOB_FINISHED: HeadService._m_job_finished,
    m.ACTOR_REGISTER: HeadService._m_actor_register,
    m.ACTOR_STATE: HeadService._m_actor_state,
    m.ACTOR_WATCH: HeadService._m_actor_watch,
    m.KILL_ACTOR: HeadService._m_kill_actor,
    m.RPC: HeadService._m_rpc,
    m.RESERVE_REFUSED: HeadService._m_reserve_refused,
}
