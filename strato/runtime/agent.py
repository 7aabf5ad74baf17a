"""The node agent: worker pool, local scheduling, resource accounting, object store,
object transfer, and the owner-side bookkeeping (retries, lineage) for its clients.

One asyncio loop. Local processes (drivers, workers) talk to it over framed unix
sockets; other agents and the head over the links in ``transport``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from strato.exceptions import (
    ActorDiedError,
    ObjectLostError,
    TaskCancelledError,
    WorkerCrashedError,
)
from strato.runtime import scheduler
from strato.runtime.protocol.framing import FrameProtocol
from strato.runtime.serialization import serialize
from strato.runtime.spec import ACTOR_CALL, TASK, ReturnValue, TaskSpec
from strato.runtime.store import ObjectStore

log = logging.getLogger("strato.agent")

PIPELINE_DEPTH = 10
CHUNK = 4 * 1024 * 1024
PULL_WINDOW = 4


def error_bytes(exc: BaseException) -> bytes:
    return serialize(exc).to_bytes()


@dataclass
class Worker:
    worker_id: bytes
    proc: asyncio.subprocess.Process | None = None
    conn: FrameProtocol | None = None
    state: str = "starting"          # starting | idle | leased | actor | dead
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
    pending_actor: tuple | None = None   # actor to become once the process connects


@dataclass
class Client:
    client_id: bytes
    conn: FrameProtocol
    role: str
    job_id: bytes
    worker: Worker | None = None


class ObjEntry:
    """An object owned by one of this node's clients."""

    __slots__ = ("state", "inline", "node", "size", "lineage", "waiters", "owner_client")

    def __init__(self, owner_client: bytes, lineage: TaskSpec | None = None):
        self.state = "pending"   # pending | ready | error | lost
        self.inline: bytes | None = None
        self.node: bytes | None = None
        self.size = 0
        self.lineage = lineage
        self.waiters: list = []
        self.owner_client = owner_client


class NodeAgent:
    def __init__(self, *, node_id: bytes, resources: dict[str, float], temp_dir: str,
                 session_dir: str, shm_dir: str, object_store_memory: int,
                 address: str, labels: dict | None = None, python: str = sys.executable,
                 worker_env: dict | None = None):
        self.node_id = node_id
        self.total = dict(resources)
        self.available = dict(resources)
        self.temp_dir = temp_dir
        self.session_dir = session_dir
        self.socket_path = os.path.join(session_dir, f"agent-{node_id.hex()[:8]}.sock")
        self.address = address  # host:port peers use to reach this agent
        self.labels = labels or {}
        self.python = python
        self.worker_env = worker_env or {}
        self.store = ObjectStore(shm_dir, os.path.join(session_dir, f"spill-{node_id.hex()[:8]}"),
                                 object_store_memory)
        self.free_gpus = list(range(int(resources.get("GPU", 0))))
        self.clients: dict[bytes, Client] = {}
        self.workers: dict[bytes, Worker] = {}
        self.idle_workers: list[Worker] = []
        self.starting_workers = 0
        self.ready: dict[tuple, deque] = {}       # shape key -> specs placed here
        self.waiting: list[TaskSpec] = []         # no node has room now (or ever)
        self.warned_infeasible: set = set()
        self.fns: dict[bytes, bytes] = {}
        self.peer_fns: dict[bytes, set] = {}      # node -> fn ids already sent
        # owner side
        self.objects: dict[bytes, ObjEntry] = {}
        self.owned_tasks: dict[bytes, tuple[TaskSpec, bytes | None]] = {}  # id -> (spec, node)
        self.dep_waits: dict[bytes, list[TaskSpec]] = {}
        self.remote_wants: dict[bytes, list] = {}   # oid -> callbacks waiting for remote info
        self.pulls: dict[bytes, asyncio.Future] = {}
        # actors
        self.actor_locations: dict[bytes, tuple] = {}  # actor_id -> (state, node_id, error)
        self.actor_queues: dict[bytes, list] = {}      # calls waiting for a location
        self.actor_workers: dict[bytes, Worker] = {}
        self.cancelled: set[bytes] = set()
        # cluster view and links
        self.view: dict[bytes, scheduler.NodeView] = {}
        self.head = None          # link with .send(msg)
        self.peers = None         # PeerLinks with .send(node_id, msg)
        self.draining = False
        self._dead_nodes: set[bytes] = set()
        self.idle_since: float | None = time.time()
        self._rpc_seq = 0
        self._rpc_waiters: dict[int, tuple] = {}
        self._server: asyncio.AbstractServer | None = None
        self._dispatch_scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self, prestart_workers: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_unix_server(
            lambda: FrameProtocol(self._on_client_batch, self._on_client_close), self.socket_path)
        os.chmod(self.socket_path, 0o600)
        for _ in range(prestart_workers):
            self._start_worker()

    async def stop(self) -> None:
        self.closing = True
        for w in list(self.workers.values()):
            if w.proc and w.proc.returncode is None:
                try:
                    w.proc.kill()
                except ProcessLookupError:
                    pass
        for w in list(self.workers.values()):
            if w.proc:
                try:
                    await asyncio.wait_for(w.proc.wait(), 5)
                except (asyncio.TimeoutError, ProcessLookupError):
                    pass
        if self._server:
            self._server.close()
        self.store.clear()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def local_view(self) -> scheduler.NodeView:
        return scheduler.NodeView(self.node_id, self.total, self.available, True, self.draining)

    def heartbeat(self) -> tuple:
        busy = any(w.state in ("leased", "actor") for w in self.workers.values()) or self.ready_count()
        if busy or self.store.used or self.objects:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.time()
        demand: dict[tuple, int] = {}
        for spec in self.waiting:
            demand[spec.shape_key()] = demand.get(spec.shape_key(), 0) + 1
        for key, q in self.ready.items():
            if q and not scheduler.fits(dict(key), self.available):
                demand[key] = demand.get(key, 0) + len(q)
        infeasible = {s.shape_key() for s in self.waiting if s.task_id in self.warned_infeasible}
        return ("heartbeat", self.node_id, dict(self.available), self.idle_since,
                [(dict(k), n, k in infeasible) for k, n in demand.items()],
                self.store.used, self.num_actors())

    def ready_count(self) -> int:
        return sum(len(q) for q in self.ready.values())

    def num_actors(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == "actor")

    # ------------------------------------------------------------------ workers
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
        env["STRATO_AGENT_SOCKET"] = self.socket_path
        env["STRATO_WORKER_ID"] = w.worker_id.hex()
        env["STRATO_NODE_ID"] = self.node_id.hex()
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
        prefix = f"(pid={w.pid}, node={self.node_id.hex()[:8]})"
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
                    c.conn.send(("log", lines))
        elif self.peers:
            self.peers.send(node, ("log", job_id, lines))

    def _on_worker_exit(self, w: Worker) -> None:
        if w.state == "starting":
            self.starting_workers -= 1
        prev = w.state
        w.state = "dead"
        self.workers.pop(w.worker_id, None)
        if w in self.idle_workers:
            self.idle_workers.remove(w)
        if self.closing:
            return
        if prev == "leased" and w.lease_shape:
            if not w.blocked:
                scheduler.release(self.available, w.lease_shape)
            else:
                scheduler.release(self.available, {k: v for k, v in w.lease_shape.items() if k != "CPU"})
        self._free_gpus(w)
        code = w.proc.returncode if w.proc else None
        if prev == "actor" and w.actor_id is not None:
            self.actor_workers.pop(w.actor_id, None)
            # calls arriving before the head's verdict wait for it (restart or death)
            self.actor_locations[w.actor_id] = ("restarting", None, None)
            if w.actor_spec and w.actor_spec.resources:
                scheduler.release(self.available, w.actor_spec.resources)
            err = ActorDiedError(f"actor {w.actor_spec.name if w.actor_spec else ''} died: worker "
                                 f"process {w.pid} exited with code {code}")
            for spec in w.inflight.values():
                self._complete_with_error(spec, err, crashed=False)
            w.inflight.clear()
            self.head.send(("actor_state", w.actor_id, "dead", self.node_id, error_bytes(err)))
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

    def _free_gpus(self, w: Worker) -> None:
        if w.gpu_ids:
            self.free_gpus.extend(w.gpu_ids)
            self.free_gpus.sort()
            w.gpu_ids = []

    # ------------------------------------------------------------------ client connections
    def _on_client_close(self, conn: FrameProtocol) -> None:
        client = conn.peer
        if client is None or self.closing:
            return
        self.clients.pop(client.client_id, None)
        if client.role == "driver":
            # the job is over: free what it owned, stop its actors
            for oid, entry in list(self.objects.items()):
                if entry.owner_client == client.client_id:
                    self._free_owned(oid)
            for key, q in self.ready.items():
                self.ready[key] = deque(s for s in q if s.job_id != client.job_id)
            self.waiting = [s for s in self.waiting if s.job_id != client.job_id]
            self.head.send(("job_finished", client.job_id))
            self._schedule_dispatch()

    def _on_client_batch(self, conn: FrameProtocol, batch: list) -> None:
        client = conn.peer
        for msg in batch:
            kind = msg[0]
            if client is None:
                if kind != "hello":
                    conn.transport.close()
                    return
                client = self._hello(conn, msg)
                continue
            try:
                getattr(self, "_c_" + kind)(client, msg)
            except Exception:
                log.exception("failed to handle %s from %s", kind, client.role)
        self._dispatch_now()

    def _hello(self, conn: FrameProtocol, msg) -> Client:
        _, role, client_id, job_id, worker_id = msg
        client = Client(client_id, conn, role, job_id or (self.node_id + client_id))
        conn.peer = client
        self.clients[client_id] = client
        if role == "worker":
            w = self.workers.get(worker_id)
            if w is None:
                w = Worker(worker_id=worker_id)
                self.workers[worker_id] = w
            else:
                self.starting_workers -= 1
            w.conn = conn
            client.worker = w
            if w.state == "starting":
                w.state = "idle"
                self.idle_workers.append(w)
                pending = w.pending_actor
                if pending is not None:
                    self.idle_workers.remove(w)
                    self._init_actor(w, *pending)
        conn.send(("welcome", self.node_id, self.store.shm_dir, self.store.spill_dir,
                   self.address))
        if role == "driver":
            self.head.send(("job_started", job_id, self.node_id))
        return client

    def _c_fn(self, client: Client, msg) -> None:
        self.fns[msg[1]] = msg[2]

    def _c_submit(self, client: Client, msg) -> None:
        for spec in msg[1]:
            for oid in spec.return_ids:
                self.objects[oid] = ObjEntry(client.client_id, spec)
            self.owned_tasks[spec.task_id] = (spec, None)
            self._resolve_then_place(spec)

    def _c_put(self, client: Client, msg) -> None:
        _, oid, inline, size = msg
        entry = ObjEntry(client.client_id)
        entry.state = "ready"
        entry.size = size
        if inline is not None:
            entry.inline = inline
        else:
            entry.node = self.node_id
            self.store.sealed(oid, size)
        self.objects[oid] = entry

    def _c_free(self, client: Client, msg) -> None:
        for oid in msg[1]:
            self._free_owned(oid)

    def _c_want(self, client: Client, msg) -> None:
        for oid, owner_node in msg[1]:
            self._want(oid, owner_node, lambda info, c=client, o=oid: self._deliver(c, o, info))

    def _c_actor_create(self, client: Client, msg) -> None:
        spec, meta = msg[1], msg[2]
        # the head owns creation from here (placement, restarts); nothing to track here
        self.head.send(("actor_register", spec, meta, self.fns.get(spec.function_id)))

    def _c_actor_call(self, client: Client, msg) -> None:
        for spec in msg[1]:
            for oid in spec.return_ids:
                self.objects[oid] = ObjEntry(client.client_id, None)
            self.owned_tasks[spec.task_id] = (spec, None)
            self._route_actor_call(spec)

    def _c_done(self, client: Client, msg) -> None:
        _, task_id, returns, retryable = msg
        w = client.worker
        spec = w.inflight.pop(task_id, None)
        if spec is None:
            return
        if w.state == "leased" and not w.inflight:
            self._end_lease(w)
        self._task_finished(spec, returns, retryable, self.node_id)

    def _c_blocked(self, client: Client, msg) -> None:
        w = client.worker
        if w is None or w.state != "leased" or w.blocked:
            return
        w.blocked = True
        returned = []
        for tid in msg[1]:
            spec = w.inflight.pop(tid, None)
            if spec is not None:
                returned.append(spec)
        for spec in reversed(returned):
            self.ready.setdefault(spec.shape_key(), deque()).appendleft(spec)
        cpu = w.lease_shape.get("CPU", 0)
        if cpu:
            self.available["CPU"] = self.available.get("CPU", 0) + cpu

    def _c_bounce(self, client: Client, msg) -> None:
        """A blocked worker handed back work that reached it after it blocked."""
        w = client.worker
        for tid in reversed(msg[1]):
            spec = w.inflight.pop(tid, None)
            if spec is not None:
                self.ready.setdefault(spec.shape_key(), deque()).appendleft(spec)
        if w.state == "leased" and not w.inflight and not w.blocked:
            self._end_lease(w)

    def _c_unblocked(self, client: Client, msg) -> None:
        w = client.worker
        if w is None or not w.blocked:
            return
        w.blocked = False
        cpu = w.lease_shape.get("CPU", 0)
        if cpu and w.state == "leased":
            self.available["CPU"] = self.available.get("CPU", 0) - cpu

    def _c_actor_ready(self, client: Client, msg) -> None:
        _, actor_id, err = msg
        w = client.worker
        if err is None:
            self.head.send(("actor_state", actor_id, "alive", self.node_id, None))
        else:
            self.head.send(("actor_state", actor_id, "failed", self.node_id, err))
            w.actor_id = None
            if w.proc:
                w.proc.kill()

    def _c_cancel(self, client: Client, msg) -> None:
        _, task_id, force = msg
        self._cancel(task_id, force)

    def _c_rpc(self, client: Client, msg) -> None:
        _, rid, method, args = msg
        local = getattr(self, "_rpc_" + method, None)
        if local is not None:
            try:
                client.conn.send(("rpc_reply", rid, True, local(*args)))
            except Exception as exc:  # reply with the error rather than dropping the link
                client.conn.send(("rpc_reply", rid, False, exc))
            return
        self._head_rpc(method, args, lambda ok, value: client.conn.send(("rpc_reply", rid, ok, value)))

    def _c_kill_actor(self, client: Client, msg) -> None:
        self.head.send(("kill_actor", msg[1], msg[2]))

    def _rpc_node_id(self):
        return self.node_id

    def _rpc_debug_state(self) -> dict:
        """This agent's scheduling state, for `strato status` and failing tests."""
        return {"available": dict(self.available), "draining": self.draining,
                "ready": {str(dict(k)): len(q) for k, q in self.ready.items() if q},
                "waiting": len(self.waiting),
                "workers": {w.pid: (w.state, len(w.inflight), w.blocked)
                            for w in self.workers.values()},
                "view": {n.hex()[:8]: dict(v.available) for n, v in self.view.items()}}

    def _head_rpc(self, method: str, args: tuple, callback) -> None:
        self._rpc_seq += 1
        self._rpc_waiters[self._rpc_seq] = callback
        self.head.send(("rpc", self._rpc_seq, method, args))

    # ------------------------------------------------------------------ objects
    def _deliver(self, client: Client, oid: bytes, info: tuple) -> None:
        """Give a client an object: inline bytes, error, or once it is in the local store."""
        kind = info[0]
        if kind == "node" and info[1] != self.node_id:
            self._pull(oid, info[1], info[2], lambda ok, err=None: client.conn.send(
                ("obj", oid, "local", None) if ok else ("obj", oid, "error", err)))
            return
        if kind == "node":
            client.conn.send(("obj", oid, "local", None))
        else:
            client.conn.send(("obj", oid, kind, info[1]))

    def _entry_info(self, entry: ObjEntry) -> tuple:
        if entry.state == "error":
            return ("error", entry.inline)
        if entry.inline is not None:
            return ("inline", entry.inline)
        return ("node", entry.node, entry.size)

    def _want(self, oid: bytes, owner_node: bytes, callback) -> None:
        """Call ``callback(info)`` once the object's value or location is known."""
        entry = self.objects.get(oid)
        if entry is not None:
            if entry.state in ("ready", "error"):
                callback(self._entry_info(entry))
            elif entry.state == "lost":
                self._reconstruct_or_fail(oid, entry, callback)
            else:
                entry.waiters.append(callback)
            return
        if oid in self.store:
            callback(("node", self.node_id, self.store.size_of(oid)))
            return
        if owner_node == self.node_id or owner_node not in self.view:
            if owner_node != self.node_id and owner_node in self.dead_nodes():
                callback(("error", error_bytes(ObjectLostError(
                    f"object {oid.hex()} lost: its owner's node {owner_node.hex()[:8]} died"))))
                return
            if owner_node == self.node_id:
                callback(("error", error_bytes(ObjectLostError(
                    f"object {oid.hex()} is unknown (freed or never created)"))))
                return
        waiters = self.remote_wants.setdefault(oid, [])
        waiters.append(callback)
        if len(waiters) == 1:
            self.peers.send(owner_node, ("obj_want", oid, self.node_id))

    def dead_nodes(self) -> set:
        return self._dead_nodes

    def _set_ready(self, oid: bytes, ret: ReturnValue) -> None:
        entry = self.objects.get(oid)
        if entry is None:
            # freed already: drop stored copy
            if ret.node is not None:
                self._delete_copy(oid, ret.node)
            return
        entry.size = ret.size
        entry.inline = ret.inline
        entry.node = ret.node
        entry.state = "error" if ret.error else "ready"
        waiters, entry.waiters = entry.waiters, []
        info = self._entry_info(entry)
        for cb in waiters:
            cb(info)

    def _free_owned(self, oid: bytes) -> None:
        entry = self.objects.pop(oid, None)
        if entry is None:
            return
        if entry.node is not None:
            self._delete_copy(oid, entry.node)

    def _delete_copy(self, oid: bytes, node: bytes) -> None:
        if node == self.node_id:
            self.store.delete(oid)
        elif self.peers:
            self.peers.send(node, ("free_copies", [oid]))

    def _pull(self, oid: bytes, node: bytes, size: int, done) -> None:
        """Fetch a remote object into the local store in chunks, a bounded window at once."""
        if oid in self.store:
            done(True)
            return
        fut = self.pulls.get(oid)
        if fut is None:
            fut = self.loop.create_future()
            self.pulls[oid] = fut
            self.loop.create_task(self._run_pull(oid, node, size, fut))

        def _finished(f):
            exc = f.exception()
            done(exc is None, None if exc is None else error_bytes(exc))
        fut.add_done_callback(_finished)

    async def _run_pull(self, oid: bytes, node: bytes, size: int, fut) -> None:
        fd, tmp = self.store.new_file(oid, size)
        try:
            offsets = list(range(0, size, CHUNK)) or [0]
            pending: dict[int, asyncio.Future] = {}
            nxt = 0
            while nxt < len(offsets) or pending:
                while nxt < len(offsets) and len(pending) < PULL_WINDOW:
                    off = offsets[nxt]
                    nxt += 1
                    pending[off] = self.peers.request(node, ("pull_chunk", oid, off, CHUNK))
                done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
                for off in [o for o, f in pending.items() if f in done]:
                    ok, data = pending.pop(off).result()
                    if not ok:
                        raise ObjectLostError(f"object {oid.hex()} could not be fetched from node "
                                              f"{node.hex()[:8]}: {data}")
                    os.pwrite(fd, data, off)
            os.close(fd)
            fd = -1
            self.store.finish_file(oid, tmp, size)
            fut.set_result(True)
        except Exception as exc:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            fut.set_exception(exc)
            fut.exception()
        finally:
            self.pulls.pop(oid, None)

    def _reconstruct_or_fail(self, oid: bytes, entry: ObjEntry, callback) -> None:
        spec = entry.lineage
        if spec is None or spec.kind != TASK:
            callback(("error", error_bytes(ObjectLostError(
                f"object {oid.hex()} was lost with its node and cannot be rebuilt "
                "(made by put or an actor)"))))
            return
        entry.waiters.append(callback)
        if spec.task_id in self.owned_tasks:
            return  # already re-running
        entry.state = "pending"
        for other in spec.return_ids:
            e = self.objects.get(other)
            if e is not None:
                e.state = "pending"
        spec.dep_values = None
        self.owned_tasks[spec.task_id] = (spec, None)
        self._resolve_then_place(spec)

    # ------------------------------------------------------------------ task placement
    def _resolve_then_place(self, spec: TaskSpec) -> None:
        if not spec.deps:
            self._place(spec)
            return
        spec.dep_values = {}
        missing = len(spec.deps)
        state = {"missing": missing}

        def got(oid, info, spec=spec):
            if info[0] == "error":
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
            self._schedule_dispatch()
        else:
            if where == scheduler.INFEASIBLE and spec.task_id not in self.warned_infeasible:
                self.warned_infeasible.add(spec.task_id)
                self._warn_owner(spec, f"task {spec.name} needs {spec.resources}, which no node "
                                 "taking work offers (draining nodes excluded); it stays "
                                 "pending until such a node joins (the autoscaler sees it as "
                                 "demand)")
            self.waiting.append(spec)

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
            target.conn.send(("warn", text))

    def _forward(self, spec: TaskSpec, node: bytes) -> None:
        view = self.view.get(node)
        if view is not None:
            scheduler.acquire(view.available, spec.resources)  # optimistic until next view
        sent = self.peer_fns.setdefault(node, set())
        blob = None
        if spec.function_id not in sent:
            blob = self.fns.get(spec.function_id)
            sent.add(spec.function_id)
        if spec.owner_node == self.node_id:
            self.owned_tasks[spec.task_id] = (spec, node)
        self.peers.send(node, ("run_task", spec, blob))

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

    # ------------------------------------------------------------------ local dispatch
    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled and self.loop is not None:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
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

    def _worker_for(self, key: tuple, shape: dict) -> Worker | None:
        if scheduler.fits(shape, self.available):
            if self.idle_workers:
                w = self.idle_workers.pop()
                w.state = "leased"
                w.lease_shape = shape
                w.lease_key = key
                scheduler.acquire(self.available, shape)
                gpus = int(-(-shape.get("GPU", 0) // 1))
                if gpus:
                    w.gpu_ids, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]
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
            if w.state == "leased" and w.lease_key == key and not w.blocked \
                    and len(w.inflight) < PIPELINE_DEPTH:
                if best is None or len(w.inflight) < len(best.inflight):
                    best = w
        return best

    def _end_lease(self, w: Worker) -> None:
        if not w.blocked:
            scheduler.release(self.available, w.lease_shape)
        else:
            scheduler.release(self.available, {k: v for k, v in w.lease_shape.items() if k != "CPU"})
        w.blocked = False
        self._free_gpus(w)
        w.state = "idle"
        w.lease_shape = {}
        w.lease_key = ()
        self.idle_workers.append(w)
        self._schedule_dispatch()
        if self.waiting:
            self._retry_waiting()

    def _prefetch_then_send(self, w: Worker, specs: list, fns: dict) -> None:
        """Pull remote arguments into the local store before the worker sees the task."""
        remote = []
        for spec in specs:
            if spec.dep_values:
                for oid, info in spec.dep_values.items():
                    if info[0] == "node" and info[1] != self.node_id and oid not in self.store:
                        remote.append((oid, info))
        gpu = w.gpu_ids
        if not remote:
            w.conn.send(("exec", specs, fns, gpu))
            return
        state = {"n": len(remote)}

        def one_done(ok, err=None):
            state["n"] -= 1
            if state["n"] == 0 and w.conn is not None:
                w.conn.send(("exec", specs, fns, gpu))
        for oid, info in remote:
            self._pull(oid, info[1], info[2], one_done)

    # ------------------------------------------------------------------ completion
    def _task_finished(self, spec: TaskSpec, returns: list, retryable: bool,
                       ran_on: bytes) -> None:
        if spec.owner_node != self.node_id:
            self.peers.send(spec.owner_node, ("task_done", spec, returns, retryable, ran_on))
            return
        owned = self.owned_tasks.get(spec.task_id)
        if owned is None:
            return
        if retryable and self._may_retry(spec):
            self._retry(spec)
            return
        self.owned_tasks.pop(spec.task_id, None)
        for ret in returns:
            self._set_ready(ret.oid, ret)
        client = self.clients.get(spec.owner_client)
        if client is not None:
            client.conn.send(("result", returns))

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

    # ------------------------------------------------------------------ cancel
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
                    w.conn.send(("cancel", task_id))
                return
        owned = self.owned_tasks.get(task_id)
        if owned is not None and owned[1] is not None and owned[1] != self.node_id:
            self.peers.send(owned[1], ("cancel", task_id, force))

    # ------------------------------------------------------------------ actors
    def _route_actor_call(self, spec: TaskSpec) -> None:
        loc = self.actor_locations.get(spec.actor_id)
        if loc is None or loc[0] in ("pending", "restarting"):
            q = self.actor_queues.setdefault(spec.actor_id, [])
            q.append(spec)
            if loc is None and len(q) == 1:
                self.actor_locations[spec.actor_id] = ("pending", None, None)
                self.head.send(("actor_watch", spec.actor_id, self.node_id))
            return
        state, node, err = loc
        if state != "alive":
            self._complete_with_error(spec, _actor_error(err, spec))
            return
        if node == self.node_id:
            self._deliver_actor_call(spec)
        else:
            if spec.owner_node == self.node_id:
                self.owned_tasks[spec.task_id] = (spec, node)
            self.peers.send(node, ("actor_call", spec))

    def _deliver_actor_call(self, spec: TaskSpec) -> None:
        w = self.actor_workers.get(spec.actor_id)
        if w is None or w.conn is None:
            loc = self.actor_locations.get(spec.actor_id)
            if loc is not None and loc[0] in ("pending", "restarting"):
                self.actor_queues.setdefault(spec.actor_id, []).append(spec)
                return
            err = loc[2] if loc else None
            self._complete_with_error(spec, _actor_error(err, spec))
            return
        w.inflight[spec.task_id] = spec
        w.conn.send(("exec", [spec], {}, w.gpu_ids))

    def _on_actor_update(self, actor_id: bytes, state: str, node: bytes | None, err) -> None:
        self.actor_locations[actor_id] = (state, node, err)
        if state in ("alive", "dead"):
            queued = self.actor_queues.pop(actor_id, [])
            for spec in queued:
                self._route_actor_call(spec)

    def _create_actor(self, spec: TaskSpec, blob: bytes | None) -> None:
        if blob is not None:
            self.fns[spec.function_id] = blob
        if spec.resources:
            scheduler.acquire(self.available, spec.resources)
        if self.idle_workers:
            # an idle pool worker becomes the actor's dedicated process
            self._init_actor(self.idle_workers.pop(), spec)
            return
        w = self._start_worker()
        w.pending_actor = (spec,)

    def _init_actor(self, w: Worker, spec: TaskSpec) -> None:
        w.state = "actor"
        w.actor_id = spec.actor_id
        w.actor_spec = spec
        w.job_id = spec.job_id
        gpus = int(-(-spec.resources.get("GPU", 0) // 1))
        if gpus:
            w.gpu_ids, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]
        self.actor_workers[spec.actor_id] = w
        w.sent_fns.add(spec.function_id)
        w.conn.send(("actor_init", spec, self.fns.get(spec.function_id), w.gpu_ids))

    def _kill_actor_here(self, actor_id: bytes) -> None:
        w = self.actor_workers.get(actor_id)
        if w is not None and w.proc is not None and w.proc.returncode is None:
            w.proc.kill()

    # ------------------------------------------------------------------ head messages
    def on_head_message(self, msg) -> None:
        kind = msg[0]
        if kind == "view":
            # own copies: optimistic accounting here must never touch the head's records
            # (in-process links hand over the very objects)
            self.view = {v.node_id: scheduler.NodeView(v.node_id, v.total, dict(v.available),
                                                       v.alive, v.draining)
                         for v in msg[1] if v.node_id != self.node_id}
            self._dead_nodes = set(msg[2])
            if self.peers is not None:
                self.peers.addresses.update(msg[3])
            me = next((v for v in msg[1] if v.node_id == self.node_id), None)
            if me is not None and me.draining and not self.draining:
                self._drain()
            self._retry_waiting()
        elif kind == "rpc_reply":
            cb = self._rpc_waiters.pop(msg[1], None)
            if cb is not None:
                cb(msg[2], msg[3])
        elif kind == "actor_update":
            self._on_actor_update(msg[1], msg[2], msg[3], msg[4])
        elif kind == "create_actor":
            self._create_actor(msg[1], msg[2])
        elif kind == "kill_actor":
            self._kill_actor_here(msg[1])
        elif kind == "node_dead":
            self._on_node_dead(msg[1])
        elif kind == "drain":
            self._drain()
        elif kind == "actor_checkpoint":
            w = self.actor_workers.get(msg[1])
            if w is not None and w.conn is not None:
                w.conn.send(("checkpoint",))
        self._dispatch_now()

    def _drain(self) -> None:
        """Take no new work: queued tasks not yet started go elsewhere (or wait)."""
        if self.draining:
            return
        self.draining = True
        log.warning("draining: no new work will run on this node")
        queued = [spec for q in self.ready.values() for spec in q]
        self.ready.clear()
        for spec in queued:
            if spec.owner_node == self.node_id:
                self._place(spec)
            else:
                self.peers.send(spec.owner_node, ("task_rejected", spec, self.node_id))

    def _on_node_dead(self, node: bytes) -> None:
        self.view.pop(node, None)
        self._dead_nodes = self.dead_nodes() | {node}
        self.peer_fns.pop(node, None)
        if self.peers:
            self.peers.forget(node)
        for task_id, (spec, where) in list(self.owned_tasks.items()):
            if where == node and spec.kind == ACTOR_CALL:
                if self._may_retry(spec):
                    spec.attempt += 1
                    self.owned_tasks[task_id] = (spec, None)
                    self.actor_locations[spec.actor_id] = ("restarting", None, None)
                    self._route_actor_call(spec)
                else:
                    self._complete_with_error(spec, ActorDiedError(
                        f"actor {spec.name.split('.')[0]} died with node {node.hex()[:8]}; "
                        f"call {spec.method} was in flight"))
            elif where == node:
                if spec.kind == TASK and self._may_retry(spec):
                    spec.attempt += 1
                    spec.dep_values = None
                    self.owned_tasks[task_id] = (spec, None)
                    self._resolve_then_place(spec)
                elif spec.kind == TASK:
                    self._complete_with_error(spec, WorkerCrashedError(
                        f"node {node.hex()[:8]} running {spec.name} died"))
        for entry in self.objects.values():
            if entry.node == node and entry.state == "ready":
                entry.state = "lost"
                entry.node = None
        self._schedule_dispatch()

    # ------------------------------------------------------------------ peer messages
    def on_peer_message(self, node: bytes, msg, reply=None) -> None:
        kind = msg[0]
        if kind == "run_task":
            spec, blob = msg[1], msg[2]
            if blob is not None:
                self.fns[spec.function_id] = blob
            if self.draining or not scheduler.fits(spec.resources, self.available):
                # the owner's view was stale: let it place the task again rather than
                # queue it here behind work that may never finish
                self.peers.send(spec.owner_node, ("task_rejected", spec, self.node_id))
                return
            self.ready.setdefault(spec.shape_key(), deque()).append(spec)
            self._schedule_dispatch()
        elif kind == "task_rejected":
            spec = msg[1]
            rejected_by = msg[2] if len(msg) > 2 else None
            view = self.view.get(rejected_by)
            if view is not None:
                # until the next view, count that node as full for this shape
                for name, amount in spec.resources.items():
                    view.available[name] = min(view.available.get(name, 0.0),
                                               max(0.0, amount - 1e-6))
            self.owned_tasks[spec.task_id] = (spec, None)
            self._place(spec)
        elif kind == "task_done":
            _, spec, returns, retryable, ran_on = msg
            self._task_finished(spec, returns, retryable, ran_on)
        elif kind == "obj_want":
            oid, requester = msg[1], msg[2]
            self._want(oid, self.node_id,
                       lambda info, o=oid, r=requester: self.peers.send(r, ("obj_info", o, info)))
        elif kind == "obj_info":
            oid, info = msg[1], msg[2]
            for cb in self.remote_wants.pop(oid, []):
                cb(info)
        elif kind == "pull_chunk":
            _, oid, off, n = msg
            mm = self.store.open(oid)
            if mm is None:
                reply((False, "object not in store"))
            else:
                reply((True, bytes(mm[off:off + n])))
                mm.close()
        elif kind == "free_copies":
            for oid in msg[1]:
                self.store.delete(oid)
        elif kind == "actor_call":
            self._deliver_actor_call(msg[1])
        elif kind == "cancel":
            self._cancel(msg[1], msg[2])
        elif kind == "log":
            self._route_log(msg[1], msg[2])
        self._dispatch_now()


def _actor_error(err, spec: TaskSpec) -> BaseException:
    if isinstance(err, bytes):
        from strato.runtime.serialization import deserialize
        try:
            return deserialize(err)
        except Exception:
            pass
    return ActorDiedError(f"actor {spec.name} is dead; call {spec.method} not run")
