"""The node agent itself: lifecycle, client connections, and the one routing table.

Owns: the unix-socket server, ``clients``, resource totals (``total``, ``available``),
the ``store``, the links (``head``, ``peers``), ``draining`` and the agent-side RPCs.
Every message the agent receives is routed by ``ROUTES``: message kind -> handler and
the links it may arrive on. Handlers live in the concern's mixin: ``workers``,
``objects``, ``refs``, ``actors``, ``routing``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from strato.exceptions import HeadUnreachableError
from strato.runtime import messages as m
from strato.runtime import scheduler
from strato.runtime.agent.actors import ActorHost
from strato.runtime.agent.bundles import BundleHost
from strato.runtime.agent.direct import DirectCalls
from strato.runtime.agent.durable import HEAD_OWNED, DurableCalls
from strato.runtime.agent.leases import LeaseGrants
from strato.runtime.agent.objects import ObjectManager
from strato.runtime.agent.refs import RefCounting
from strato.runtime.agent.routing import TaskRouter
from strato.runtime.agent.sessions import ClientSessions
from strato.runtime.agent.workers import Worker, WorkerPool
from strato.runtime.protocol.framing import FrameProtocol
from strato.runtime.store import ObjectStore

log = logging.getLogger("strato.agent")

# the links a message may arrive on
CLIENT = 1      # a driver or worker on this node (framed unix socket); handler(client, msg)
HEAD = 2        # the head service; handler(None, msg)
PEER = 4        # another node's agent; handler(sender node_id, msg)
REQUEST = 8     # a peer request that wants an answer; handler(reply, msg)


@dataclass
class Client:
    client_id: bytes
    conn: FrameProtocol
    role: str                     # "driver" | "worker"
    job_id: bytes
    worker: Worker | None = None
    remote: bool = False          # a remote driver on the client endpoint
    session: str | None = None    # its session id (kept across reconnects)
    bye: bool = False             # it disconnected cleanly (BYE)
    exported: set = field(default_factory=set)   # function ids it sent (kept while here)
    lease_wants: set = field(default_factory=set)   # shapes it asked a leased worker for


class NodeAgent(WorkerPool, ObjectManager, RefCounting, ActorHost, TaskRouter,
                ClientSessions, DurableCalls, BundleHost, DirectCalls, LeaseGrants):
    """One per node, on one asyncio loop: worker pool, local scheduling, resource
    accounting, object store and transfer, and the owner-side bookkeeping (retries,
    lineage) for its clients. Local processes reach it over framed unix sockets;
    other agents and the head over the links in ``transport``."""

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
        self.clients: dict[bytes, Client] = {}
        self.head = None          # link with .send(msg)
        self.peers = None         # PeerLinks with .send(node_id, msg)
        self.draining = False
        self.idle_since: float | None = time.time()
        self._rpc_seq = 0
        self._rpc_waiters: dict[int, Callable] = {}
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.exit_requested: Callable[[str], None] | None = None   # node.py stops on it
        self._init_workers(resources)
        self._init_objects()
        self._init_refs()
        self._init_actors()
        self._init_routing()
        self._init_sessions()
        self._init_durable()
        self._init_bundles()
        self._init_direct()
        self._init_leases()
        self._routes: dict[int, dict[str, Callable]] = {CLIENT: {}, HEAD: {}, PEER: {}, REQUEST: {}}
        for kind, (handler, links) in ROUTES.items():
            for link, table in self._routes.items():
                if links & link:
                    table[kind] = handler.__get__(self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, prestart_workers: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        old_umask = os.umask(0o077)  # the socket is 0600 from the moment it exists
        try:
            self._server = await self.loop.create_unix_server(
                lambda: FrameProtocol(self._on_client_batch, self._on_client_close),
                self.socket_path)
        finally:
            os.umask(old_umask)
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
        self.stop_client_endpoint()
        self.store.clear()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def local_view(self) -> scheduler.NodeView:
        return scheduler.NodeView(self.node_id, self.total, self.available, True, self.draining)

    def heartbeat(self) -> tuple:
        if self.busy() or self.store.used or self.objects:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.time()
        return (m.HEARTBEAT, self.node_id, dict(self.available), self.idle_since,
                self.demand(), self.store.used, self.num_actors())

    # ------------------------------------------------------------------ receiving
    def _dispatch(self, table: dict, src, msg) -> None:
        try:
            table[msg[0]](src, msg)
        except KeyError:
            if msg[0] in table:
                raise
            log.warning("ignored a %r message: not expected on this link", msg[0])

    def _on_client_batch(self, conn: FrameProtocol, batch: list) -> None:
        client = conn.peer
        table = self._routes[CLIENT]
        for msg in batch:
            if client is None:
                if msg[0] != m.HELLO:
                    conn.transport.close()
                    return
                client = self._hello(conn, msg)
                continue
            try:
                table[msg[0]](client, msg)
            except Exception:
                log.exception("failed to handle %s from %s", msg[0], client.role)
        self._dispatch_now()

    def on_head_message(self, msg) -> None:
        self._dispatch(self._routes[HEAD], None, msg)
        self._dispatch_now()

    def on_peer_message(self, node: bytes, msg) -> None:
        self._dispatch(self._routes[PEER], node, msg)
        self._dispatch_now()

    def on_peer_request(self, node: bytes, msg, reply: Callable) -> None:
        self._dispatch(self._routes[REQUEST], reply, msg)

    # ------------------------------------------------------------------ clients
    def _hello(self, conn: FrameProtocol, msg) -> Client:
        _, role, client_id, job_id, worker_id = msg[:5]
        client = Client(client_id, conn, role, job_id or (self.node_id + client_id))
        conn.peer = client
        resumed = False
        if getattr(conn, "authed", False):   # the client endpoint: a remote driver
            if role != "driver":
                conn.transport.close()
                return client
            resumed = self._attach_session(client)
        self.clients[client_id] = client
        if role == "worker":
            client.worker = self.attach_worker(worker_id, conn)
            client.worker.direct_path = msg[5] if len(msg) > 5 else None
        conn.send((m.WELCOME, self.node_id, self.store.shm_dir, self.store.spill_dir,
                   self.address))
        if role == "driver" and not resumed:
            self.head.send((m.JOB_STARTED, client.job_id, self.node_id))
        return client

    def _on_client_close(self, conn: FrameProtocol) -> None:
        client = conn.peer
        if client is None or self.closing or self.clients.get(client.client_id) is not client:
            return   # not attached, or a stale connection a resumed session replaced
        self.clients.pop(client.client_id, None)
        if self.leased:
            self.leases_of_gone_client(client.client_id)
        if client.remote:
            if not client.bye:
                self._session_lost(client)   # its refs are kept for the grace period
                return
            self._session_closed(client)
        self.exited_owners.add(client.client_id[:8])   # (for OwnerDiedError's message)
        if client.role == "driver":
            self._job_over(client.client_id, client.job_id)
        else:   # a worker that exited (or was killed) holds nothing any more
            self._client_refs_gone(client.client_id, owned=True)

    def _job_over(self, client_id: bytes, job_id: bytes) -> None:
        """A driver left: free what it owned, drop its borrows and queued tasks (not its
        durable calls, which the head owns), stop its actors."""
        self._client_refs_gone(client_id, owned=False)
        self._free_client_objects(client_id)
        for key, q in self.ready.items():
            self.ready[key] = deque(s for s in q if s.job_id != job_id
                                    or s.owner_client == HEAD_OWNED)
        self.waiting = [s for s in self.waiting if s.job_id != job_id
                        or s.owner_client == HEAD_OWNED]
        self.head.send((m.JOB_FINISHED, job_id))
        self._schedule_dispatch()

    def on_rpc(self, client: Client, msg) -> None:
        """Answer from this agent (``_rpc_<method>``) or ask the head."""
        _, rid, method, args = msg
        local = getattr(self, "_rpc_" + method, None)
        if local is not None:
            try:
                client.conn.send((m.RPC_REPLY, rid, True, local(*args)))
            except Exception as exc:  # reply with the error rather than dropping the link
                client.conn.send((m.RPC_REPLY, rid, False, exc))
            return
        if not getattr(self.head, "connected", True):
            client.conn.send((m.RPC_REPLY, rid, False, HeadUnreachableError(
                f"{method}: the head is unreachable (restarting?); try again")))
            return
        self._rpc_seq += 1
        self._rpc_waiters[self._rpc_seq] = \
            lambda ok, value: client.conn.send((m.RPC_REPLY, rid, ok, value))
        self.head.send((m.RPC, self._rpc_seq, method, args))

    def head_lost(self) -> None:
        """The link to the head broke: RPCs waiting for its answer get an error now."""
        waiters, self._rpc_waiters = self._rpc_waiters, {}
        for callback in waiters.values():
            callback(False, HeadUnreachableError("the connection to the head was lost "
                                                 "(restarting?); try again"))

    def _rpc_node_id(self):
        return self.node_id

    def _rpc_debug_state(self) -> dict:
        """This agent's scheduling state, for `strato status` and failing tests."""
        return {"available": dict(self.available), "draining": self.draining,
                "ready": {str(dict(k)): len(q) for k, q in self.ready.items() if q},
                "waiting": len(self.waiting), "owned_tasks": len(self.owned_tasks),
                "workers": {w.pid: (w.state.value, len(w.inflight), w.blocked)
                            for w in self.workers.values()},
                "objects": len(self.objects), "borrowed": len(self.borrowed),
                "store_used": self.store.used,
                "view": {n.hex()[:8]: dict(v.available) for n, v in self.view.items()}}

    # ------------------------------------------------------------------ head
    def on_view(self, _head, msg) -> None:
        _, views, dead, addresses = msg
        # own copies: optimistic accounting here must never touch the head's records
        # (in-process links hand over the very objects)
        self.view = {v.node_id: scheduler.NodeView(v.node_id, v.total, dict(v.available),
                                                   v.alive, v.draining)
                     for v in views if v.node_id != self.node_id}
        if dead is not None:   # the full list comes once, at registration; then NODE_DEAD
            for node in dead:
                self._dead_nodes.add(node)
        if self.peers is not None:
            self.peers.addresses.update(addresses)
        me = next((v for v in views if v.node_id == self.node_id), None)
        if me is not None and me.draining and not self.draining:
            self._drain()
        self._retry_waiting()

    def on_rpc_reply(self, _head, msg) -> None:
        _, rid, ok, value = msg
        callback = self._rpc_waiters.pop(rid, None)
        if callback is not None:
            callback(ok, value)

    def on_drain(self, _head, msg) -> None:
        self._drain()

    def on_exit(self, _head, msg) -> None:
        """The head declared this node dead (it stalled past the heartbeat timeout): its
        work was failed over elsewhere, so it stops rather than run on as a zombie."""
        log.error("stopping: %s", msg[1])
        if self.exit_requested is not None:
            self.exit_requested(msg[1])

    def on_node_dead(self, _head, msg) -> None:
        node = msg[1]
        self.view.pop(node, None)
        self._dead_nodes.add(node)
        self.peer_fns.pop(node, None)
        self.bulk_ports.pop(node, None)
        if self.bulk is not None:
            self.bulk.cancel_node(node)
        if self.peers:
            self.peers.forget(node)
        self._tasks_lost_with(node)
        self._objects_lost_with(node)
        self._refs_lost_with(node)
        self._schedule_dispatch()


# kind -> (handler, links it may arrive on)
ROUTES: dict[str, tuple[Callable, int]] = {
    # from drivers and workers
    m.FN: (TaskRouter.on_fn, CLIENT),
    m.SUBMIT: (TaskRouter.on_submit, CLIENT),
    m.CANCEL: (TaskRouter.on_cancel, CLIENT | PEER),
    m.PUT: (ObjectManager.on_put, CLIENT),
    m.REFS: (RefCounting.on_refs, CLIENT),
    m.WANT: (ObjectManager.on_want, CLIENT),
    m.ACTOR_CREATE: (ActorHost.on_actor_create, CLIENT),
    m.ACTOR_CALLS: (ActorHost.on_actor_calls, CLIENT),
    m.KILL_ACTOR: (ActorHost.on_kill_actor, CLIENT),
    m.ACTOR_WHERE: (DirectCalls.on_actor_where, CLIENT),
    m.DIRECT_LOST: (DirectCalls.on_direct_lost, CLIENT),
    m.WANT_LEASE: (LeaseGrants.on_want_lease, CLIENT),
    m.LEASE_RETURN: (LeaseGrants.on_lease_return, CLIENT),
    m.RPC: (NodeAgent.on_rpc, CLIENT),
    # from remote drivers (the client endpoint)
    m.SPAWN: (DurableCalls.on_spawn, CLIENT),
    m.CANCEL_SESSION: (ClientSessions.on_cancel_session, CLIENT),
    m.BYE: (ClientSessions.on_bye, CLIENT),
    # from workers
    m.DONE: (WorkerPool.on_done, CLIENT),
    m.BLOCKED: (WorkerPool.on_blocked, CLIENT),
    m.UNBLOCKED: (WorkerPool.on_unblocked, CLIENT),
    m.BOUNCE: (WorkerPool.on_bounce, CLIENT),
    m.ACTOR_READY: (ActorHost.on_actor_ready, CLIENT),
    # from the head
    m.VIEW: (NodeAgent.on_view, HEAD),
    m.RPC_REPLY: (NodeAgent.on_rpc_reply, HEAD),
    m.DRAIN: (NodeAgent.on_drain, HEAD),
    m.NODE_DEAD: (NodeAgent.on_node_dead, HEAD),
    m.EXIT: (NodeAgent.on_exit, HEAD),
    m.ACTOR_UPDATE: (ActorHost.on_actor_update, HEAD),
    m.CREATE_ACTOR: (ActorHost.on_create_actor, HEAD),
    m.STOP_ACTOR: (ActorHost.on_stop_actor, HEAD),
    m.ACTOR_CHECKPOINT: (ActorHost.on_actor_checkpoint, HEAD),
    m.RESERVE_BUNDLES: (BundleHost.on_reserve_bundles, HEAD),
    m.RELEASE_BUNDLES: (BundleHost.on_release_bundles, HEAD),
    m.PG_REMOVED: (BundleHost.on_pg_removed, HEAD),
    # from other agents
    m.RUN_TASK: (TaskRouter.on_run_task, PEER),
    m.TASK_REJECTED: (TaskRouter.on_task_rejected, PEER),
    m.TASK_DONE: (TaskRouter.on_task_done, PEER),
    m.PEER_ACTOR_CALL: (ActorHost.on_peer_actor_call, PEER),
    m.OBJ_WANT: (ObjectManager.on_obj_want, PEER),
    m.OBJ_INFO: (ObjectManager.on_obj_info, PEER),
    m.FREE_COPIES: (ObjectManager.on_free_copies, PEER),
    m.OBJ_COPY: (RefCounting.on_obj_copy, PEER),
    m.REF_OPS: (RefCounting.on_ref_ops, PEER | REQUEST),
    m.JOB_LOG: (WorkerPool.on_job_log, PEER),
    m.PULL_CHUNK: (ObjectManager.on_pull_chunk, REQUEST),
    m.BULK_PORT: (ObjectManager.on_bulk_port, REQUEST),
}
