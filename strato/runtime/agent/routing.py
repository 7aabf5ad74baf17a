"""The agent's task routing: where each task runs, and the owner's side of its life.

Owns: ``fns`` (exported functions by id) and ``peer_fns`` (which a peer already has),
``owned_tasks`` (tasks this node's clients submitted: spec and the node running it),
``waiting`` (tasks no node has room for now, or ever: the demand the autoscaler sees),
``warned_infeasible``, ``cancelled``, and the cluster ``view`` from the head.
Resolves dependencies, places a task here (into ``ready``), on a peer (RUN_TASK) or
in ``waiting``; on completion retries or hands results to the owner; cancels; drains.
"""

from __future__ import annotations

import logging
from collections import deque

from strato.exceptions import NodeDiedError, TaskCancelledError
from strato.runtime import messages as m
from strato.runtime import placement, scheduler
from strato.runtime.agent.objects import ObjEntry, error_bytes
from strato.runtime.bounded import BoundedSet
from strato.runtime.spec import ACTOR_CALL, TASK, ReturnValue, TaskSpec

#: tasks one owner may send to wait on another node beyond its room (``_queue_remotely``)
QUEUED_PER_NODE = 2

log = logging.getLogger("strato.agent")


class TaskRouter:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_routing(self) -> None:
        self.fns: dict[bytes, bytes] = {}
        self.peer_fns: dict[bytes, set] = {}      # node -> fn ids already sent
        self._unneeded_fns: set = set()           # found unneeded at the last sweep
        self.owned_tasks: dict[bytes, tuple[TaskSpec, bytes | None]] = {}  # id -> (spec, node)
        self.waiting: list[TaskSpec] = []         # no node has room now (or ever)
        self.warned_infeasible: set = set()
        # bounded: a long-lived cluster cancels without end; a cancel older than the last
        # 10k that reaches a node after the task finished there changes nothing anyway
        self.cancelled = BoundedSet(maxlen=10_000)
        self.view: dict[bytes, scheduler.NodeView] = {}
        # node -> ids of tasks sent there to wait for room (``_queue_remotely``)
        self.queued_at: dict[bytes, set] = {}
        self._dead_nodes = BoundedSet(maxlen=10_000)

    def dead_nodes(self) -> BoundedSet:
        return self._dead_nodes

    def demand(self) -> list:
        """[(shape, count, infeasible)] of tasks that wait for room (for the heartbeat)."""
        counts: dict[tuple, int] = {}
        for spec in self.waiting:
            counts[spec.shape_key()] = counts.get(spec.shape_key(), 0) + 1
        for key, q in self.ready.items():
            if q and not scheduler.fits(dict(key), self.available):
                counts[key] = counts.get(key, 0) + len(q)
        infeasible = {s.shape_key() for s in self.waiting if s.task_id in self.warned_infeasible}
        return [(dict(k), n, k in infeasible) for k, n in counts.items()]

    # ------------------------------------------------------------------ from clients
    def on_fn(self, client, msg) -> None:
        _, function_id, blob = msg
        self.fns[function_id] = blob
        client.exported.add(function_id)

    def prune_functions(self) -> list:
        """Forget exported functions nothing here needs any more, so a node that serves
        many jobs for weeks stays flat. Kept: what connected clients exported, and the
        functions of queued, running and owned tasks, hosted actors, durable calls and
        objects' lineage. A function must be found unneeded at two sweeps in a row; a
        peer that later sends a task without it gets it asked for again
        (``TASK_REJECTED`` with ``no function``), workers are told to drop it."""
        keep: set = set()
        for client in self.clients.values():
            keep |= client.exported
        for q in self.ready.values():
            keep.update(s.function_id for s in q)
        keep.update(s.function_id for s in self.waiting)
        keep.update(s.function_id for s, _ in self.owned_tasks.values())
        for w in self.workers.values():
            keep.update(s.function_id for s in w.inflight.values())
            for spec in (w.actor_spec, w.pending_actor):
                if spec is not None:
                    keep.add(spec.function_id)
        keep.update(e.lineage.function_id for e in self.objects.values()
                    if e.lineage is not None)
        keep.update(c.spec.function_id for c in self.durable.values())
        unneeded = {f for f in self.fns if f not in keep}
        drop = [f for f in unneeded if f in self._unneeded_fns]
        self._unneeded_fns = unneeded.difference(drop)
        if not drop:
            return drop
        for fid in drop:
            del self.fns[fid]
        gone = set(drop)
        for sent in self.peer_fns.values():
            sent -= gone
        for w in self.workers.values():
            forget = w.sent_fns & gone
            if forget and w.conn is not None:
                w.sent_fns -= forget
                w.conn.send((m.FORGET_FNS, list(forget)))
        return drop

    def on_submit(self, client, msg) -> None:
        for spec in msg[1]:
            for oid in spec.return_ids:
                self.objects[oid] = ObjEntry(client.client_id, spec)
            if spec.deps or spec.nested:
                self._hold_lineage(spec)
            self.owned_tasks[spec.task_id] = (spec, None)
            self._resolve_then_place(spec)

    def on_cancel(self, src, msg) -> None:
        _, task_id, force = msg[:3]
        if len(msg) > 3:    # a task on a worker lent to this client (runtime.leases)
            self.cancel_leased(src, task_id, force, msg[3])
            return
        self._cancel(task_id, force)

    # ------------------------------------------------------------------ from peers
    def on_run_task(self, node: bytes, msg) -> None:
        _, spec, blob, *rest = msg
        may_wait = bool(rest and rest[0])     # its owner sent it to wait here for room
        if blob is not None:
            self.fns[spec.function_id] = blob
        elif spec.function_id not in self.fns:
            # pruned here since the owner sent it: ask for it again with the task
            self.peers.send(spec.owner_node, (m.TASK_REJECTED, spec, self.node_id, True))
            return
        if self.draining or not (scheduler.fits(spec.resources, self.available) or (
                may_wait and scheduler.fits(spec.resources, self.total))):
            # the owner's view was stale: let it place the task again rather than
            # queue it here behind work that may never finish
            self.peers.send(spec.owner_node, (m.TASK_REJECTED, spec, self.node_id))
            return
        self.ready.setdefault(spec.shape_key(), deque()).append(spec)
        self._prefetch_args(spec)
        self._schedule_dispatch()

    def on_task_rejected(self, node: bytes, msg) -> None:
        spec, rejected_by = msg[1], msg[2]
        view = self.view.get(rejected_by)
        if len(msg) > 3 and msg[3]:   # it lacks the function: send it with the task again
            self.peer_fns.get(rejected_by, set()).discard(spec.function_id)
        elif view is not None:
            # until the next view, count that node as full for this shape
            for name, amount in spec.resources.items():
                view.available[name] = min(view.available.get(name, 0.0),
                                           max(0.0, amount - 1e-6))
        queued = self.queued_at.get(rejected_by)
        if queued:
            queued.discard(spec.task_id)
        self.owned_tasks[spec.task_id] = (spec, None)
        self._place(spec)

    def on_task_done(self, node: bytes, msg) -> None:
        _, spec, returns, retryable, ran_on = msg
        freed = self._forwarded_done(spec, ran_on)
        self._task_finished(spec, returns, retryable, ran_on)
        if freed and self.waiting:
            self._retry_waiting()

    def _forwarded_done(self, spec: TaskSpec, ran_on: bytes) -> bool:
        """A task this node sent to ``ran_on`` finished there: its room there counts as
        free again now. (``_forward`` took it from the view until the head's next VIEW;
        without this, tasks for a busy node waited for that VIEW, one per 0.2 s.)"""
        queued = self.queued_at.get(ran_on)
        if queued and spec.task_id in queued:
            queued.discard(spec.task_id)    # (it took the room of one before it)
            return True
        entry = self.owned_tasks.get(spec.task_id)
        view = self.view.get(ran_on)
        if entry is None or entry[1] != ran_on or view is None:
            return False
        available, total = view.available, view.total
        for name, amount in spec.resources.items():
            available[name] = min(total.get(name, 0.0), available.get(name, 0.0) + amount)
        return True

    # ------------------------------------------------------------------ placement
    def _resolve_then_place(self, spec: TaskSpec) -> None:
        if not spec.deps:
            self._place(spec)
            return
        spec.dep_values = {}
        state = {"missing": len(spec.deps)}

        def got(oid, info, spec=spec):
            if info[0] == m.ERROR:
                # a failed dependency fails the task with the dependency's error
                if spec.task_id in self.owned_tasks and not state.get("failed"):
                    state["failed"] = True
                    returns = [ReturnValue(rid, info[1], None, len(info[1]), True)
                               for rid in spec.return_ids]
                    self._task_finished(spec, returns, False, self.node_id)
                return
            spec.dep_values[oid] = info
            state["missing"] -= 1
            if state["missing"] == 0:
                self._place(spec)

        for oid, owner_node in spec.deps:
            self._want(oid, owner_node, lambda info, o=oid: got(o, info))

    def _place(self, spec: TaskSpec) -> None:
        if spec.task_id in self.cancelled:
            self._complete_with_error(spec, TaskCancelledError(f"task {spec.name} cancelled"))
            return
        where, node = scheduler.place(spec.resources, self.local_view(), list(self.view.values()))
        if where == scheduler.REMOTE:
            self._forward(spec, node)
        elif where == scheduler.LOCAL or (where == scheduler.WAIT and self._only_here(spec)):
            self.ready.setdefault(spec.shape_key(), deque()).append(spec)
            self._prefetch_args(spec)
            self._schedule_dispatch()
        elif self.in_removed_group(spec):
            self.fail_removed_group_task(spec)   # it would wait for a group that is gone
        elif where == scheduler.WAIT and self._queue_remotely(spec):
            pass
        else:
            # (a placement group's task waits for its group, which is the demand)
            if where == scheduler.INFEASIBLE and spec.task_id not in self.warned_infeasible \
                    and not placement.is_group_shape(spec.resources):
                self.warned_infeasible.add(spec.task_id)
                self._warn_owner(spec, f"task {spec.name} needs {spec.resources}, which no node "
                                 "taking work offers (draining nodes excluded); it stays "
                                 "pending until such a node joins (the autoscaler sees it as "
                                 "demand)")
            self.waiting.append(spec)

    def _queue_remotely(self, spec: TaskSpec) -> bool:
        """No node has room for it now, and this node never could: send it to wait on a
        node that can run it, up to ``QUEUED_PER_NODE`` per node (the fewest first).
        There it starts as soon as the task before it ends, without a round trip back
        to this node for the next one (as Ray pipelines tasks onto a leased worker)."""
        if scheduler.fits(spec.resources, self.total) or placement.is_group_shape(spec.resources):
            return False
        best, fewest = None, QUEUED_PER_NODE
        for v in self.view.values():
            if v.alive and not v.draining and scheduler.fits(spec.resources, v.total):
                n = len(self.queued_at.get(v.node_id, ()))
                if n < fewest:
                    best, fewest = v.node_id, n
        if best is None:
            return False
        self.queued_at.setdefault(best, set()).add(spec.task_id)
        self._forward(spec, best, may_wait=True)
        return True

    def _only_here(self, spec: TaskSpec) -> bool:
        """Queue locally only when no other node could ever run it; otherwise keep it
        in ``waiting``, re-placed whenever a node frees up."""
        if self.draining or not scheduler.fits(spec.resources, self.total):
            return False
        return not any(v.alive and not v.draining and scheduler.fits(spec.resources, v.total)
                       for v in self.view.values())

    def _warn_owner(self, spec: TaskSpec, text: str) -> None:
        client = self.clients.get(spec.owner_client)
        target = client
        if client is None or client.role != "driver":
            for c in self.clients.values():
                if c.role == "driver" and c.job_id == spec.job_id:
                    target = c
        if target is not None:
            target.conn.send((m.WARN, text))

    def _forward(self, spec: TaskSpec, node: bytes, may_wait: bool = False) -> None:
        view = self.view.get(node)
        if view is not None and not may_wait:
            scheduler.acquire(view.available, spec.resources)  # optimistic until next view
        sent = self.peer_fns.setdefault(node, set())
        blob = None
        if spec.function_id not in sent:
            blob = self.fns.get(spec.function_id)
            sent.add(spec.function_id)
        if spec.owner_node == self.node_id:
            self.owned_tasks[spec.task_id] = (spec, node)
        self.peers.send(node, (m.RUN_TASK, spec, blob, may_wait))

    def _retry_waiting(self) -> None:
        if not self.waiting:
            return
        waiting, self.waiting = self.waiting, []
        stuck: set[tuple] = set()   # shapes that found no node: the rest of them wait too
        for spec in waiting:
            key = spec.shape_key()
            if key in stuck:
                self.waiting.append(spec)
                continue
            before = len(self.waiting)
            self._place(spec)
            if len(self.waiting) > before:
                stuck.add(key)

    def _drain(self) -> None:
        """Take no new work: queued tasks not yet started go elsewhere (or wait)."""
        if self.draining:
            return
        self.draining = True
        log.warning("draining: no new work will run on this node")
        self.revoke_leases(every=True)   # lent workers too, once their tasks are done
        queued = [spec for q in self.ready.values() for spec in q]
        self.ready.clear()
        for spec in queued:
            if spec.owner_node == self.node_id:
                self._place(spec)
            else:
                self.peers.send(spec.owner_node, (m.TASK_REJECTED, spec, self.node_id))

    def _tasks_lost_with(self, node: bytes) -> None:
        """Owned tasks and actor calls in flight on a dead node: retry or fail them."""
        self.queued_at.pop(node, None)
        for task_id, (spec, where) in list(self.owned_tasks.items()):
            if where != node:
                continue
            if spec.kind == ACTOR_CALL:
                self._actor_call_lost_with(node, spec)
            elif spec.kind == TASK and self._may_retry(spec):
                spec.attempt += 1
                spec.dep_values = None
                self.owned_tasks[task_id] = (spec, None)
                self._resolve_then_place(spec)
            elif spec.kind == TASK:
                self._complete_with_error(spec, NodeDiedError(
                    f"node {node.hex()[:8]} running {spec.name} died and the task has no "
                    "retries left (max_retries)"))

    # ------------------------------------------------------------------ completion
    def _task_finished(self, spec: TaskSpec, returns: list, retryable: bool,
                       ran_on: bytes) -> None:
        if spec.owner_node != self.node_id:
            # after the holds the task registered (borrows of its arguments, refs in its
            # results) are acknowledged: the owner then unpins its arguments
            self.send_after_holds(spec.owner_node,
                                  (m.TASK_DONE, spec, returns, retryable, ran_on))
            return
        if spec.task_id not in self.owned_tasks:
            self._discard_returns(returns)
            return
        if retryable and self._may_retry(spec):
            self._discard_returns(returns)
            self._retry(spec)
            return
        self.owned_tasks.pop(spec.task_id, None)
        for ret in returns:
            self._set_ready(ret.oid, ret)
        if spec.deps or spec.nested:
            self._drop_rebuilt_args(spec)
        client = self.clients.get(spec.owner_client)
        if client is not None:
            client.conn.send((m.RESULT, returns))

    def _may_retry(self, spec: TaskSpec) -> bool:
        if spec.kind == ACTOR_CALL:
            limit = (spec.actor_options or {}).get("max_task_retries", 0)
        else:
            limit = spec.max_retries
        return limit == -1 or spec.attempt < limit

    def _retry(self, spec: TaskSpec) -> None:
        spec.attempt += 1
        spec.dep_values = None
        if spec.kind == ACTOR_CALL:
            self._route_actor_call(spec)
        else:
            self._resolve_then_place(spec)

    def _complete_with_error(self, spec: TaskSpec, exc: BaseException, crashed: bool = False) -> None:
        data = error_bytes(exc)
        returns = [ReturnValue(oid, data, None, len(data), True) for oid in spec.return_ids]
        self._task_finished(spec, returns, crashed, self.node_id)

    def _cancel(self, task_id: bytes, force: bool) -> None:
        self.cancelled.add(task_id)
        for q in self.ready.values():
            for spec in list(q):
                if spec.task_id == task_id:
                    q.remove(spec)
                    self._complete_with_error(spec, TaskCancelledError(f"task {spec.name} cancelled"))
                    return
        for spec in list(self.waiting):
            if spec.task_id == task_id:
                self.waiting.remove(spec)
                self._complete_with_error(spec, TaskCancelledError(f"task {spec.name} cancelled"))
                return
        for w in self.workers.values():
            if task_id in w.inflight:
                if force and w.proc is not None:
                    w.proc.kill()
                elif w.conn is not None:
                    w.conn.send((m.CANCEL_EXEC, task_id))
                return
        owned = self.owned_tasks.get(task_id)
        if owned is not None and owned[1] is not None and owned[1] != self.node_id:
            self.peers.send(owned[1], (m.CANCEL, task_id, force))
