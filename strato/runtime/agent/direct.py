"""The agent's part in direct actor calls (``runtime.direct``): it tells callers where a
local actor's worker takes calls, takes back the calls in flight when that process dies,
and keeps the results of direct calls that others may read.

Owns: ``direct_askers`` (callers waiting for an actor here to be ready) and
``freed_unknown`` (direct-call results their owner dropped before this agent heard of
them: if the worker registers one later, it is freed at once).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from strato.exceptions import ActorUnavailableError
from strato.runtime import messages as m
from strato.runtime.agent.actors import _actor_error
from strato.runtime.agent.objects import ObjEntry
from strato.runtime.agent.workers import Worker, WorkerState
from strato.runtime.bounded import BoundedSet
from strato.runtime.messages import ActorState
from strato.runtime.spec import ReturnValue

#: seconds a live actor process has to exit after a caller's channel to it broke, before
#: the calls that were in flight on it end as lost in transit
LOST_GRACE_S = 2.0


class DirectCalls:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_direct(self) -> None:
        self.direct_askers: dict[bytes, list] = {}
        self.freed_unknown = BoundedSet(maxlen=100_000)
        # (actor id, pid) -> (error, restart) of the last dead actor processes: calls
        # handed back after the death was handled end as those it had in flight did
        self._deaths: OrderedDict = OrderedDict()

    def note_actor_death(self, actor_id: bytes, pid: int, err: BaseException,
                         restart: bool) -> None:
        self._deaths[(actor_id, pid)] = (err, restart)
        while len(self._deaths) > 1000:
            self._deaths.popitem(last=False)

    def on_actor_where(self, client, msg) -> None:
        actor_id = msg[1]
        if not client.remote:
            w = self.actor_workers.get(actor_id)
            if w is not None and w.conn is not None and w.actor_ready \
                    and w.direct_path is not None:
                client.conn.send((m.ACTOR_HERE, actor_id, w.direct_path, w.pid))
                return
            loc = self.actor_locations.get(actor_id)
            if (w is not None and not w.actor_ready) or loc is None \
                    or loc.state in (ActorState.PENDING, ActorState.RESTARTING):
                # not placed or not ready yet: answered when it is (``direct_ready``)
                # or when the head says it lives elsewhere (``direct_placed``)
                self.direct_askers.setdefault(actor_id, []).append(client)
                return
        client.conn.send((m.ACTOR_HERE, actor_id, None, 0))

    def direct_placed(self, actor_id: bytes, state: ActorState, node: bytes | None) -> None:
        """The head's word on an actor: callers still asking learn it is not here."""
        if state in (ActorState.PENDING, ActorState.RESTARTING):
            return
        if actor_id in self.direct_askers and (state is not ActorState.ALIVE
                                               or node != self.node_id):
            for client in self.direct_askers.pop(actor_id):
                client.conn.send((m.ACTOR_HERE, actor_id, None, 0))

    def direct_ready(self, w: Worker, ok: bool) -> None:
        """An actor's ``__init__`` is done (``ok``: it succeeded): callers waiting learn
        where it takes calls."""
        w.actor_ready = ok
        path = w.direct_path if ok else None
        for client in self.direct_askers.pop(w.actor_id, []):
            client.conn.send((m.ACTOR_HERE, w.actor_id, path, w.pid if path else 0))

    def direct_worker_gone(self, w: Worker) -> None:
        """A worker process exited: its socket goes (it may have been SIGKILLed)."""
        if w.actor_id is not None:
            self.direct_askers.pop(w.actor_id, None)
        if w.direct_path:
            try:
                os.unlink(w.direct_path)
            except OSError:
                pass

    def on_direct_lost(self, client, msg) -> None:
        """A caller's channel to an actor's process broke with calls in flight: they are
        this agent's now, as if it had routed them (retried or failed)."""
        _, actor_id, pid, specs = msg
        if actor_id is None:     # a leased worker's (named by worker id, not pid)
            self.leased_tasks_lost(client, pid, specs)
            return
        objects, freed = self.objects, self.freed_unknown
        for spec in specs:
            for oid in spec.return_ids:
                if oid not in objects and oid not in freed:
                    objects[oid] = ObjEntry(client.client_id, None)
            self.owned_tasks[spec.task_id] = (spec, None)
        w = self.actor_workers.get(actor_id)
        if w is not None and w.pid == pid and w.state is WorkerState.ACTOR:
            # its exit is not handled yet: that handling retries or fails them (a
            # channel breaks when its process dies); if it lives on, see _lost_overdue
            for spec in specs:
                w.inflight[spec.task_id] = spec
            self.loop.call_later(LOST_GRACE_S, self._lost_overdue, w,
                                 [spec.task_id for spec in specs])
            return
        death = self._deaths.get((actor_id, pid))
        if death is not None:
            for spec in specs:
                self._complete_with_error(spec, death[0], crashed=death[1])
            return
        loc = self.actor_locations.get(actor_id)
        for spec in specs:
            if loc is not None and loc.state is ActorState.DEAD:
                self._complete_with_error(spec, _actor_error(loc.error, spec))
            else:
                self._complete_with_error(spec, ActorUnavailableError(
                    f"actor {spec.name.split('.')[0]} is restarting (worker process {pid} "
                    f"exited); call {spec.method} was running and did not finish"),
                    crashed=True)

    def _lost_overdue(self, w: Worker, task_ids: list) -> None:
        """Calls handed back from a broken channel to an actor process that did not exit
        (the channel broke some other way): they may or may not have run, and their
        results can no longer reach the caller. They end as calls lost in transit:
        retried within ``max_task_retries`` (through this agent), else
        ActorUnavailableError, rather than wait for an exit that is not coming."""
        if w.state is not WorkerState.ACTOR:
            return            # it exited: that handling ended them
        for tid in task_ids:
            spec = w.inflight.pop(tid, None)
            if spec is not None:
                self._complete_with_error(spec, ActorUnavailableError(
                    f"the connection to actor {spec.name.split('.')[0]} (worker process "
                    f"{w.pid}) broke during call {spec.method}; it may or may not have run"),
                    crashed=True)

    def _rpc_direct_results(self, owner_client: bytes, returns: list) -> list:
        """A direct call's results in the store or holding refs, before its caller sees
        them: kept like any owned result (the caller frees them as usual)."""
        returns = self._account_results(returns)
        alive = owner_client in self.clients
        for ret in returns:
            oid = ret.oid
            if not alive or oid in self.freed_unknown:
                self.freed_unknown.discard(oid)
                if ret.node is not None:
                    self._delete_copy(oid, ret.node)
                if ret.contained:
                    self._release_contained(oid, ret.contained)
                continue
            if oid not in self.objects:
                self.objects[oid] = ObjEntry(owner_client, None)
            self._set_ready(oid, ret)
        return returns

    def adopt(self, cid: bytes, oid: bytes, info) -> None:
        """REF_ADOPT: a direct call's result escaped its caller; keep it from now on."""
        if oid not in self.objects:
            self.objects[oid] = ObjEntry(cid, None)
        if info is not None:
            self.adopted_ready(oid, info)

    def adopted_ready(self, oid: bytes, info) -> None:
        """REF_ADOPTED_READY: an adopted result came (if nobody holds it now: nothing)."""
        if oid in self.objects:
            data = info[1]
            self._set_ready(oid, ReturnValue(oid, data, None, len(data), info[0] == m.ERROR))
