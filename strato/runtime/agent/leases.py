"""The agent's worker leases (``runtime.leases``): lending a pool worker to one local
caller for tasks of one shape, taking it back, and the tasks a leased worker ran when
it died.

Owns: ``leased`` (workers lent now: worker id -> Worker, each with ``leased_to`` and
``lease_revoked``). A lent worker stays LEASED with its resources taken; the agent
sends it nothing of its own (no pipelining onto it) until the lease comes back.
"""

from __future__ import annotations

from strato.exceptions import TaskCancelledError, WorkerCrashedError
from strato.runtime import messages as m
from strato.runtime import scheduler
from strato.runtime.agent.objects import ObjEntry
from strato.runtime.agent.workers import Worker, WorkerState
from strato.runtime.spec import TASK, TaskSpec


class LeaseGrants:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_leases(self) -> None:
        self.leased: dict[bytes, Worker] = {}

    def on_want_lease(self, client, msg) -> None:
        if not client.remote:
            client.lease_wants.add(msg[1])

    def grant_lease(self, w: Worker, spec: TaskSpec) -> bool:
        """``w`` just finished ``spec`` and has nothing else: lend it to the task's
        caller if it asked for this shape and no other task of it waits here."""
        client = self.clients.get(spec.owner_client)
        key = w.lease_key
        if client is None or key not in client.lease_wants or spec.kind != TASK \
                or w.direct_path is None or w.blocked or self.ready.get(key) \
                or self.draining or w.gpu_ids:
            return False
        client.lease_wants.discard(key)
        w.leased_to = client.client_id
        w.lease_revoked = False
        self.leased[w.worker_id] = w
        # (before the RESULT that follows: the caller's next task can use it)
        client.conn.send((m.LEASE, key, w.worker_id, w.direct_path, w.pid))
        return True

    def on_lease_return(self, client, msg) -> None:
        w = self.leased.get(msg[1])
        if w is not None and w.leased_to == client.client_id:
            self._lease_back(w)

    def _lease_back(self, w: Worker) -> None:
        self.leased.pop(w.worker_id, None)
        w.leased_to = None
        w.lease_revoked = False
        if w.state is WorkerState.LEASED and not w.inflight:
            self._end_lease(w)

    def leases_of_gone_client(self, client_id: bytes) -> None:
        for w in [w for w in self.leased.values() if w.leased_to == client_id]:
            self._lease_back(w)

    def revoke_leases(self, every: bool = False) -> None:
        """Tasks wait here for room a lent worker holds (``every``: the node drains): ask
        its caller to give it back once the task it runs is done."""
        for w in self.leased.values():
            if w.lease_revoked:
                continue
            room = dict(self.available)
            scheduler.release(room, w.lease_shape)
            if every or any(q and scheduler.fits(q[0].resources, room)
                            for q in self.ready.values()):
                w.lease_revoked = True
                client = self.clients.get(w.leased_to)
                if client is not None:
                    client.conn.send((m.LEASE_REVOKE, w.worker_id))

    def leased_tasks_lost(self, client, worker_id: bytes, specs: list) -> None:
        """Tasks in flight on a leased worker whose channel broke: retried within
        ``max_retries`` or failed, as tasks the agent sent it (``_on_worker_exit``).

        The worker is named by its id (its pid may be another process's by now). Still
        alive, it is ended: it is lent to this caller alone, who can no longer reach
        it, and whether it got those tasks is unknown; its exit retries or fails them
        (a channel breaks when its worker dies, so that exit is usually under way)."""
        for spec in specs:
            for oid in spec.return_ids:
                if oid not in self.objects and oid not in self.freed_unknown:
                    self.objects[oid] = ObjEntry(client.client_id, spec)
            self.owned_tasks[spec.task_id] = (spec, None)
        wid = worker_id if type(worker_id) is bytes else None   # (a malformed message)
        w = self.workers.get(wid) if wid is not None else None
        if w is not None and w.state is not WorkerState.DEAD:
            for spec in specs:       # its exit is not handled yet: that ends them
                w.inflight[spec.task_id] = spec
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()
            return
        for spec in specs:
            if spec.task_id in self.cancelled:
                self._complete_with_error(spec, TaskCancelledError(f"task {spec.name} cancelled"))
            else:
                self._complete_with_error(spec, WorkerCrashedError(
                    f"leased worker {wid.hex()[:8] if wid else '?'} running {spec.name} "
                    "died"), crashed=True)

    def cancel_leased(self, client, task_id: bytes, force: bool, pid: int) -> None:
        """Cancel a task on a worker lent to ``client`` (its main thread runs it and does
        not read its direct socket meanwhile): through this agent's connection to it, or
        with ``force`` by killing the process."""
        self.cancelled.add(task_id)
        for w in self.leased.values():
            if w.pid != pid or w.leased_to != client.client_id:
                continue
            if force and w.proc is not None:
                w.proc.kill()
            elif w.conn is not None:
                w.conn.send((m.CANCEL_EXEC, task_id))
