"""The agent's actors: hosting actors on this node and routing calls to them.

Owns: ``actor_locations`` (the head's last word on each actor this node calls or
hosts), ``actor_queues`` (calls waiting for an actor to be placed or restarted),
``actor_workers`` (the dedicated worker of each actor hosted here) and ``actor_pins``
(actors created here whose argument refs this node keeps alive until they are dead). The head decides
where actors live and whether they restart; this side creates them when told
(CREATE_ACTOR), reports their state (ACTOR_STATE), and sends calls straight to the
actor's node, in the caller's order.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from strato.exceptions import ActorDiedError, ActorUnavailableError
from strato.runtime import messages as m
from strato.runtime import placement, scheduler
from strato.runtime.agent.objects import ObjEntry, error_bytes
from strato.runtime.agent.workers import Worker, WorkerState
from strato.runtime.messages import ActorState
from strato.runtime.serialization import deserialize
from strato.runtime.spec import TaskSpec

# calls to an actor in these states wait for the head's next word
_WAIT = (ActorState.PENDING, ActorState.RESTARTING)
DEAD_ACTORS_KEPT = 200


class ActorLocation(NamedTuple):
    state: ActorState
    node: bytes | None
    error: bytes | None


class ActorHost:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_actors(self) -> None:
        self.actor_locations: dict[bytes, ActorLocation] = {}
        # dead actors' locations are forgotten past the last 200 (the head answers a
        # call to a forgotten one with its death, as it does for one it forgot itself)
        self._dead_actors: deque = deque()
        self.actor_queues: dict[bytes, list] = {}
        self.actor_workers: dict[bytes, Worker] = {}
        # actors created here whose argument refs this node keeps (the actor id is the
        # borrower, ``refs``) until the head says they are dead for good
        self.actor_pins: set[bytes] = set()

    # ------------------------------------------------------------------ from clients
    def on_actor_create(self, client, msg) -> None:
        _, spec, meta, pins = msg
        if pins:
            # the actor (its id as the borrower) holds its arguments: every restart
            # reads them again; let go when the head says it is dead for good
            for oid, owner in pins:
                self._borrow(spec.actor_id, oid, owner)
            self.actor_pins.add(spec.actor_id)
        # the head owns creation from here (placement, restarts)
        self.head.send((m.ACTOR_REGISTER, spec, meta, self.fns.get(spec.function_id)))

    def on_actor_calls(self, client, msg) -> None:
        for spec in msg[1]:
            for oid in spec.return_ids:
                self.objects[oid] = ObjEntry(client.client_id, None)
            self.owned_tasks[spec.task_id] = (spec, None)
            self._route_actor_call(spec)

    def on_kill_actor(self, client, msg) -> None:
        _, actor_id, no_restart = msg
        self.head.send((m.KILL_ACTOR, actor_id, no_restart))
        if no_restart:
            # calls made after kill() fail here at once, not only once the head's word
            # comes back (until then they would still reach the live process)
            self.actor_locations[actor_id] = ActorLocation(ActorState.DEAD, None, None)

    def on_actor_ready(self, client, msg) -> None:
        """The actor's worker ran ``__init__``: alive, or failed with ``error``."""
        _, actor_id, error = msg
        w = client.worker
        self.direct_ready(w, error is None)
        if error is None:
            self.head.send((m.ACTOR_STATE, actor_id, ActorState.ALIVE, self.node_id, None))
        else:
            self.head.send((m.ACTOR_STATE, actor_id, ActorState.FAILED, self.node_id, error))
            w.actor_id = None
            if w.proc:
                w.proc.kill()

    # ------------------------------------------------------------------ from peers
    def on_peer_actor_call(self, node: bytes, msg) -> None:
        self._deliver_actor_call(msg[1])

    # ------------------------------------------------------------------ from the head
    def on_actor_update(self, _head, msg) -> None:
        _, actor_id, state, node, error = msg
        self.actor_locations[actor_id] = ActorLocation(state, node, error)
        if self.direct_askers:
            self.direct_placed(actor_id, state, node)
        if state is ActorState.DEAD:
            if actor_id in self.actor_pins:   # the arguments it was created with
                self.actor_pins.discard(actor_id)
                self._client_refs_gone(actor_id, owned=False)
            self._dead_actors.append(actor_id)
            while len(self._dead_actors) > DEAD_ACTORS_KEPT:
                old = self._dead_actors.popleft()
                loc = self.actor_locations.get(old)
                if loc is not None and loc.state is ActorState.DEAD:
                    del self.actor_locations[old]
        if state in (ActorState.ALIVE, ActorState.DEAD):
            for spec in self.actor_queues.pop(actor_id, []):
                self._route_actor_call(spec)

    def on_create_actor(self, _head, msg) -> None:
        _, spec, blob = msg
        if blob is not None:
            self.fns[spec.function_id] = blob
        if spec.resources:
            if self.leased and not scheduler.fits(spec.resources, self.available):
                self.revoke_leases(every=True)   # lent workers hold its room: back soon
            scheduler.acquire(self.available, spec.resources)
        if self.idle_workers:
            # an idle pool worker becomes the actor's dedicated process
            self._init_actor(self.idle_workers.pop(), spec)
            return
        w = self._start_worker()
        w.pending_actor = spec

    def on_stop_actor(self, _head, msg) -> None:
        _, actor_id, final = msg
        w = self.actor_workers.get(actor_id)
        if w is not None and w.proc is not None and w.proc.returncode is None:
            w.final_stop = final
            w.proc.kill()

    def on_actor_checkpoint(self, _head, msg) -> None:
        w = self.actor_workers.get(msg[1])
        if w is not None and w.conn is not None:
            w.conn.send((m.CHECKPOINT,))

    # ------------------------------------------------------------------ calls
    def _route_actor_call(self, spec: TaskSpec) -> None:
        loc = self.actor_locations.get(spec.actor_id)
        if loc is None or loc.state in _WAIT:
            q = self.actor_queues.setdefault(spec.actor_id, [])
            q.append(spec)
            if loc is None and len(q) == 1:
                self.actor_locations[spec.actor_id] = ActorLocation(ActorState.PENDING, None, None)
                self.head.send((m.ACTOR_WATCH, spec.actor_id, self.node_id))
            return
        if loc.state is not ActorState.ALIVE:
            self._complete_with_error(spec, _actor_error(loc.error, spec))
            return
        if loc.node == self.node_id:
            self._deliver_actor_call(spec)
        else:
            if spec.owner_node == self.node_id:
                self.owned_tasks[spec.task_id] = (spec, loc.node)
            self.peers.send(loc.node, (m.PEER_ACTOR_CALL, spec))

    def _deliver_actor_call(self, spec: TaskSpec) -> None:
        w = self.actor_workers.get(spec.actor_id)
        if w is None or w.conn is None:
            loc = self.actor_locations.get(spec.actor_id)
            if loc is not None and loc.state in _WAIT:
                self.actor_queues.setdefault(spec.actor_id, []).append(spec)
                return
            self._complete_with_error(spec, _actor_error(loc.error if loc else None, spec))
            return
        w.inflight[spec.task_id] = spec
        w.conn.send((m.EXEC, [spec], {}, w.gpu_ids))

    # ------------------------------------------------------------------ hosting
    def _init_actor(self, w: Worker, spec: TaskSpec) -> None:
        w.state = WorkerState.ACTOR
        w.actor_id = spec.actor_id
        w.actor_spec = spec
        w.job_id = spec.job_id
        self._take_gpus(w, placement.gpu_amount(spec.resources))
        self.actor_workers[spec.actor_id] = w
        w.sent_fns.add(spec.function_id)
        w.conn.send((m.ACTOR_INIT, spec, self.fns.get(spec.function_id), w.gpu_ids))

    def _actor_worker_died(self, w: Worker, code: int | None) -> None:
        """Fail the calls it ran and tell the head, which restarts it or declares it dead."""
        self.actor_workers.pop(w.actor_id, None)
        # calls arriving before the head's verdict wait for it (restart or death)
        self.actor_locations[w.actor_id] = ActorLocation(ActorState.RESTARTING, None, None)
        if w.actor_spec and w.actor_spec.resources:
            scheduler.release(self.available, self.live_part(w.actor_spec.resources))
        name = w.actor_spec.name if w.actor_spec else ""
        how = f"worker process {w.pid} exited with code {code}"
        err = ActorDiedError(f"actor {name} died: {how}")
        # the head restarts it unless its restarts are used up or it was killed for good
        call_err: BaseException = err
        restart = _will_restart(w)
        if restart:
            call_err = ActorUnavailableError(f"actor {name} is restarting ({how}); this call "
                                             "was running and did not finish")
        # (direct calls in flight on it that its callers hand back later end the same way)
        self.note_actor_death(w.actor_id, w.pid, call_err, restart)
        for spec in w.inflight.values():
            # with a restart coming, the owner re-runs the call on the new process while
            # max_task_retries allows (crashed=True: retryable), else it gets call_err
            self._complete_with_error(spec, call_err, crashed=restart)
        w.inflight.clear()
        self.head.send((m.ACTOR_STATE, w.actor_id, ActorState.DEAD, self.node_id, error_bytes(err)))

    def _actor_call_lost_with(self, node: bytes, spec: TaskSpec) -> None:
        """An owned call was in flight on ``node``, which died: retry it or fail it."""
        if self._may_retry(spec):
            spec.attempt += 1
            self.owned_tasks[spec.task_id] = (spec, None)
            self.actor_locations[spec.actor_id] = ActorLocation(ActorState.RESTARTING, None, None)
            self._route_actor_call(spec)
        else:
            self._complete_with_error(spec, ActorDiedError(
                f"actor {spec.name.split('.')[0]} died with node {node.hex()[:8]}; "
                f"call {spec.method} was in flight"))


def _will_restart(w: Worker) -> bool:
    """Whether the head will restart the actor of this dead worker: the head restarts
    while ``max_restarts`` allows (-1: always) and counts restarts in ``spec.attempt``."""
    spec = w.actor_spec
    if spec is None or w.final_stop:
        return False
    limit = (spec.actor_options or {}).get("max_restarts", 0)
    return limit == -1 or spec.attempt < limit


def _actor_error(err: bytes | None, spec: TaskSpec) -> BaseException:
    if isinstance(err, bytes):
        try:
            return deserialize(err)
        except Exception:
            pass
    return ActorDiedError(f"actor {spec.name} is dead; call {spec.method} not run")
