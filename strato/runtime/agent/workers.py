"""The agent's worker pool: worker processes and the tasks leased to them.

Owns: ``workers``, ``idle_workers``, ``starting_workers``, ``free_gpus`` and the
``ready`` queues (tasks placed on this node, by resource shape, waiting for a worker).
Starts worker processes and forwards their output, leases idle workers to queued
tasks (pipelining up to ``PIPELINE_DEPTH`` per worker once the node is saturated),
handles what workers report (DONE, BLOCKED, UNBLOCKED, BOUNCE) and what a worker's
death means for the tasks it ran.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections import deque
from dataclasses import dataclass, field

from strato.exceptions import TaskCancelledError, WorkerCrashedError
from strato.runtime import messages as m
from strato.runtime import placement, scheduler
from strato.runtime.protocol.framing import FrameProtocol
from strato.runtime.spec import ReturnValue, TaskSpec

log = logging.getLogger("strato.agent")

PIPELINE_DEPTH = 10


class WorkerState(enum.Enum):
    STARTING = "starting"   # process spawned, not connected yet
    IDLE = "idle"           # in the pool
    LEASED = "leased"       # runs tasks of one resource shape
    ACTOR = "actor"         # dedicated to one actor
    DEAD = "dead"


#: bytes of queued tasks' arguments pulled ahead of their turn at once, at most
PREFETCH_BYTES = 512 * 1024 * 1024

@dataclass
class Worker:
    worker_id: bytes
    proc: asyncio.subprocess.Process | None = None
    conn: FrameProtocol | None = None
    state: WorkerState = WorkerState.STARTING
    lease_shape: dict = field(default_factory=dict)
    lease_key: tuple = ()
    inflight: dict = field(default_factory=dict)   # task_id -> spec
    blocked: bool = False
    actor_id: bytes | None = None
    actor_spec: TaskSpec | None = None
    gpu_ids: list = field(default_factory=list)
    sent_fns: set = field(default_factory=set)
    job_id: bytes | None = None
    pid: int = 0
    pending_actor: TaskSpec | None = None   # actor to become once the process connects
    final_stop: bool = False   # its actor was killed for good: no restart follows
    task_name: str = ""        # of the task it ran last (its output lines' prefix)
    actor_ready: bool = False  # its actor's __init__ is done
    direct_path: str | None = None   # where it takes direct calls (runtime.direct)
    leased_to: bytes | None = None   # the client it is lent to (runtime.leases)
    lease_revoked: bool = False


class WorkerPool:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_workers(self, resources: dict) -> None:
        self.free_gpus = list(range(int(resources.get("GPU", 0))))
        self.workers: dict[bytes, Worker] = {}
        self.idle_workers: list[Worker] = []
        self.starting_workers = 0
        self.ready: dict[tuple, deque] = {}       # shape key -> specs placed here
        self._prefetching = 0                     # bytes of queued tasks' args being pulled
        self._dispatch_scheduled = False

    def ready_count(self) -> int:
        return sum(len(q) for q in self.ready.values())

    def num_actors(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is WorkerState.ACTOR)

    def busy(self) -> bool:
        return any(w.state in (WorkerState.LEASED, WorkerState.ACTOR)
                   for w in self.workers.values()) or bool(self.ready_count())

    # ------------------------------------------------------------------ processes
    def _start_worker(self) -> Worker:
        wid = os.urandom(16)
        w = Worker(worker_id=wid)
        self.workers[wid] = w
        self.starting_workers += 1
        self.loop.create_task(self._spawn(w))
        return w

    async def _spawn(self, w: Worker) -> None:
        env = dict(os.environ)
        env.update(self.worker_env)
        env.pop("STRATO_TOKEN", None)  # user code talks to its agent's socket, never needs it
        env["STRATO_AGENT_SOCKET"] = self.socket_path
        env["STRATO_WORKER_ID"] = w.worker_id.hex()
        env["STRATO_NODE_ID"] = self.node_id.hex()
        env["STRATO_NODE_TEMP_DIR"] = self.temp_dir   # working dirs are cached under it
        env["PYTHONUNBUFFERED"] = "1"
        try:
            w.proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "strato.runtime.worker",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            log.error("cannot start worker: %s", exc)
            self.starting_workers -= 1
            self.workers.pop(w.worker_id, None)
            return
        w.pid = w.proc.pid
        self.loop.create_task(self._pump_output(w))
        await w.proc.wait()
        self._on_worker_exit(w)

    async def _pump_output(self, w: Worker) -> None:
        stream = w.proc.stdout
        where = f"pid={w.pid}, node={self.node_id.hex()[:8]}"
        while True:
            lines = []
            line = await stream.readline()
            if not line:
                return
            lines.append(line)
            while len(lines) < 500:
                try:
                    nxt = await asyncio.wait_for(stream.readline(), 0.001)
                except asyncio.TimeoutError:
                    break
                if not nxt:
                    break
                lines.append(nxt)
            # like Ray: "(name pid=..., node=...)", name of the actor or of a task it runs
            name = w.actor_spec.name.split(".")[0] if w.actor_spec else w.task_name
            prefix = f"({name} {where})" if name else f"({where})"
            text = [f"{prefix} {x.decode(errors='replace').rstrip()}" for x in lines]
            if w.job_id:
                self._route_log(w.job_id, text)
            else:
                for line in text:
                    log.info("%s", line)

    def _route_log(self, job_id: bytes, lines: list[str]) -> None:
        node = job_id[:16]
        if node == self.node_id:
            for c in self.clients.values():
                if c.role == "driver" and c.job_id == job_id:
                    c.conn.send((m.LOG, lines))
        elif self.peers:
            self.peers.send(node, (m.JOB_LOG, job_id, lines))

    def on_job_log(self, node: bytes, msg) -> None:
        _, job_id, lines = msg
        self._route_log(job_id, lines)

    def attach_worker(self, worker_id: bytes, conn: FrameProtocol) -> Worker:
        """A worker process said hello: it joins the pool (or becomes its pending actor)."""
        w = self.workers.get(worker_id)
        if w is None:
            w = Worker(worker_id=worker_id)
            self.workers[worker_id] = w
        else:
            self.starting_workers -= 1
        w.conn = conn
        if w.state is WorkerState.STARTING:
            if w.pending_actor is not None:
                self._init_actor(w, w.pending_actor)
            else:
                w.state = WorkerState.IDLE
                self.idle_workers.append(w)
        return w

    def _on_worker_exit(self, w: Worker) -> None:
        if w.state is WorkerState.STARTING:
            self.starting_workers -= 1
        prev = w.state
        w.state = WorkerState.DEAD
        self.workers.pop(w.worker_id, None)
        if w in self.idle_workers:
            self.idle_workers.remove(w)
        self.direct_worker_gone(w)
        if w.leased_to is not None:
            self.leased.pop(w.worker_id, None)
        if self.closing:
            return
        if prev is WorkerState.LEASED and w.lease_shape:
            self._release_lease(w)
        self._free_gpus(w)
        code = w.proc.returncode if w.proc else None
        if prev is WorkerState.ACTOR and w.actor_id is not None:
            self._actor_worker_died(w, code)
        else:
            for spec in w.inflight.values():
                if spec.task_id in self.cancelled:
                    self._complete_with_error(spec, TaskCancelledError(f"task {spec.name} cancelled"))
                else:
                    self._complete_with_error(spec, WorkerCrashedError(
                        f"worker process {w.pid} running {spec.name} died (exit code {code})"),
                        crashed=True)
            w.inflight.clear()
        self._schedule_dispatch()

    def _take_gpus(self, w: Worker, amount: float) -> None:
        gpus = int(-(-amount // 1))
        if gpus:
            w.gpu_ids, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]

    def _free_gpus(self, w: Worker) -> None:
        if w.gpu_ids:
            self.free_gpus.extend(w.gpu_ids)
            self.free_gpus.sort()
            w.gpu_ids = []

    # ------------------------------------------------------------------ worker reports
    def on_done(self, client, msg) -> None:
        _, task_id, returns, retryable = msg
        returns = self._account_results(returns)
        w = client.worker
        spec = w.inflight.pop(task_id, None)
        if spec is None:
            self._discard_returns(returns)
            return
        if w.state is WorkerState.LEASED and not w.inflight and w.leased_to is None \
                and not self.grant_lease(w, spec):
            self._end_lease(w)
        self._task_finished(spec, returns, retryable, self.node_id)

    def on_blocked(self, client, msg) -> None:
        """The worker waits in get(): its CPU is free for others; unstarted tasks return."""
        _, handed_back = msg
        w = client.worker
        if w is None or w.state is not WorkerState.LEASED or w.blocked:
            return
        w.blocked = True
        returned = []
        for tid in handed_back:
            spec = w.inflight.pop(tid, None)
            if spec is not None:
                returned.append(spec)
        for spec in reversed(returned):
            self.ready.setdefault(spec.shape_key(), deque()).appendleft(spec)
        cpu = w.lease_shape.get("CPU", 0)
        if cpu:
            self.available["CPU"] = self.available.get("CPU", 0) + cpu

    def on_bounce(self, client, msg) -> None:
        """A blocked worker handed back work that reached it after it blocked."""
        _, task_ids = msg
        w = client.worker
        for tid in reversed(task_ids):
            spec = w.inflight.pop(tid, None)
            if spec is not None:
                self.ready.setdefault(spec.shape_key(), deque()).appendleft(spec)
        if w.state is WorkerState.LEASED and not w.inflight and not w.blocked \
                and w.leased_to is None:
            self._end_lease(w)

    def on_unblocked(self, client, msg) -> None:
        w = client.worker
        if w is None or not w.blocked:
            return
        w.blocked = False
        cpu = w.lease_shape.get("CPU", 0)
        if cpu and w.state is WorkerState.LEASED:
            self.available["CPU"] = self.available.get("CPU", 0) - cpu

    # ------------------------------------------------------------------ leasing
    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled and self.loop is not None:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
        """Hand queued tasks to workers: one EXEC per worker with all it gets now."""
        self._dispatch_scheduled = False
        sends: dict[bytes, list] = {}
        for key, queue in self.ready.items():
            if not queue:
                continue
            shape = queue[0].resources
            while queue:
                w = self._worker_for(key, shape)
                if w is None:
                    break
                spec = queue.popleft()
                w.inflight[spec.task_id] = spec
                w.job_id = spec.job_id
                w.task_name = spec.name
                sends.setdefault(w.worker_id, []).append(spec)
        for wid, specs in sends.items():
            w = self.workers.get(wid)
            if w is None or w.conn is None:
                continue
            fns = {}
            for spec in specs:
                if spec.function_id not in w.sent_fns:
                    fns[spec.function_id] = self.fns.get(spec.function_id)
                    w.sent_fns.add(spec.function_id)
            self._prefetch_then_send(w, specs, fns)
        if self.ready_count():  # queued work: busy (pooled idle processes are not work)
            self.idle_since = None
            if self.leased:
                self.revoke_leases()

    def _worker_for(self, key: tuple, shape: dict) -> Worker | None:
        if scheduler.fits(shape, self.available):
            if self.idle_workers:
                w = self.idle_workers.pop()
                w.state = WorkerState.LEASED
                w.lease_shape = shape
                w.lease_key = key
                scheduler.acquire(self.available, shape)
                self._take_gpus(w, placement.gpu_amount(shape))
                return w
            # resources are free but no worker is: start one rather than queue behind
            # a busy worker (pipelining is only for a saturated node)
            if self.starting_workers < max(1, int(self.total.get("CPU", 1))) \
                    and self.starting_workers < 4:
                self._start_worker()
            if self.starting_workers:
                return None
        best = None
        for w in self.workers.values():
            if w.state is WorkerState.LEASED and w.lease_key == key and not w.blocked \
                    and len(w.inflight) < PIPELINE_DEPTH and w.leased_to is None:
                if best is None or len(w.inflight) < len(best.inflight):
                    best = w
        return best

    def _release_lease(self, w: Worker) -> None:
        # (live_part: bundle resources of a group released meanwhile are not given back)
        shape = self.live_part(w.lease_shape)
        if not w.blocked:
            scheduler.release(self.available, shape)
        else:  # a blocked worker's CPU was given back when it blocked
            scheduler.release(self.available, {k: v for k, v in shape.items() if k != "CPU"})

    def _end_lease(self, w: Worker) -> None:
        self._release_lease(w)
        w.blocked = False
        self._free_gpus(w)
        w.state = WorkerState.IDLE
        w.lease_shape = {}
        w.lease_key = ()
        self.idle_workers.append(w)
        self._schedule_dispatch()
        if self.waiting:
            self._retry_waiting()

    def _prefetch_args(self, spec) -> None:
        """A task queued here: start pulling its arguments that live on other nodes now,
        while it waits for a worker (up to ``PREFETCH_BYTES`` in flight), so it does not
        wait for them after it got one. ``_prefetch_then_send`` joins these pulls."""
        if not spec.dep_values:
            return
        owners = dict(spec.deps)   # (a copy's owner frees it with the object)
        for oid, info in spec.dep_values.items():
            if info[0] != m.AT_NODE or info[1] == self.node_id or oid in self.store \
                    or oid in self.pulls:
                continue
            if self._prefetching + info[2] > PREFETCH_BYTES:
                return
            self._prefetching += info[2]

            def done(ok, err=None, size=info[2]):
                self._prefetching -= size
            self._pull(oid, info[1], info[2], done, owners.get(oid))

    def _prefetch_then_send(self, w: Worker, specs: list, fns: dict) -> None:
        """Pull remote arguments into the local store before the worker sees the task."""
        remote = []
        for spec in specs:
            if spec.dep_values:
                for oid, info in spec.dep_values.items():
                    if info[0] == m.AT_NODE and info[1] != self.node_id and oid not in self.store:
                        owner = next((o for d, o in spec.deps if d == oid), None)
                        remote.append((oid, info, owner))
        gpu = w.gpu_ids
        if not remote:
            w.conn.send((m.EXEC, specs, fns, gpu))
            return
        state = {"n": len(remote)}
        failed: dict[bytes, bytes] = {}

        def one_done(oid: bytes, ok: bool, err=None) -> None:
            if not ok:
                failed[oid] = err
            state["n"] -= 1
            if state["n"] == 0:
                self._send_pulled(w, specs, fns, gpu, failed)
        for oid, info, owner in remote:
            self._pull(oid, info[1], info[2], lambda ok, err=None, o=oid: one_done(o, ok, err),
                       owner)

    def _send_pulled(self, w: Worker, specs: list, fns: dict, gpu, failed: dict) -> None:
        """Arguments are in: run the tasks. One whose argument could not be pulled (its
        node died) never runs here: it goes back to its owner as retryable, which
        resolves its arguments again (rebuilding lost ones by lineage)."""
        run = []
        for spec in specs:
            err = next((failed[o] for o in (spec.dep_values or {}) if o in failed), None)
            if err is None:
                run.append(spec)
            elif w.inflight.pop(spec.task_id, None) is not None:
                returns = [ReturnValue(rid, err, None, len(err), True) for rid in spec.return_ids]
                self._task_finished(spec, returns, True, self.node_id)
        if w.conn is None:
            return
        if run:
            w.conn.send((m.EXEC, run, fns, gpu))
            return
        w.sent_fns.difference_update(fns)   # nothing went: the worker never got them
        if w.state is WorkerState.LEASED and not w.inflight and w.leased_to is None:
            self._end_lease(w)
