"""The agent's objects: ownership records for its clients' objects, and transfer.

Owns: ``objects`` (entries for objects this node's clients own: state, inline value or
location, lineage), ``remote_wants`` (callbacks waiting for another owner's answer) and
``pulls`` (copies from other nodes into the local ``store`` in flight: whole objects on
the bulk channel, ``runtime/bulk.py``; 4 MB chunks over the peer link where a node has
no bulk port).
Answers WANT from clients and OBJ_WANT from peers once a value or location is known,
serves PULL_CHUNK requests, frees copies, and rebuilds lost objects from lineage. When an
object may be freed is ``refs``' concern (reference counting); freeing it, every copy
included, is this module's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import os

from strato.exceptions import ObjectLostError, ObjectStoreFullError, OwnerDiedError
from strato.runtime import messages as m
from strato.runtime.bounded import BoundedSet
from strato.runtime.serialization import serialize
from strato.runtime.spec import TASK, ReturnValue, TaskSpec

CHUNK = 4 * 1024 * 1024
PULL_WINDOW = 4
BULK_SPLIT = 32 * 1024 * 1024   # objects from this size travel in two parallel streams
# a chunk that takes longer than this is lost (its node stalled); the pull fails over
PULL_CHUNK_TIMEOUT = float(os.environ.get("STRATO_PULL_CHUNK_TIMEOUT", "60"))
# a failed pull asks the owner again this many times (backing off 0.5, 1, 2, ... s): by
# then a dead holder is known dead and the owner rebuilds the object or names another copy
PULL_RETRIES = 5
# freed objects whose lineage is kept for their dependents' rebuilds: at most this many,
# holding at most this many bytes of task arguments (Ray's max_lineage_bytes); past either
# the oldest go, and a rebuild that would need them fails with ObjectLostError
LINEAGE_KEPT = int(os.environ.get("STRATO_LINEAGE_KEPT", "20000"))
LINEAGE_BYTES_KEPT = 128 * 1024 * 1024


def error_bytes(exc: BaseException) -> bytes:
    return serialize(exc).to_bytes()


class ObjState(enum.Enum):
    PENDING = "pending"   # its task has not finished
    READY = "ready"
    ERROR = "error"       # the value is an error
    LOST = "lost"         # its only copy was on a node that died
    FREED = "freed"       # nobody holds it: its value is gone, its lineage is kept while
                          # a live object's task took it as an argument (for rebuilds)


class RefState:
    """What an object's reference counting needs beyond its owner's own refs (most
    objects never need one: ``ObjEntry.rc`` stays None)."""

    __slots__ = ("borrowers", "contained_in", "contains", "copies")

    def __init__(self):
        self.borrowers: set | None = None        # local client ids, other node ids
        self.contained_in: dict | None = None    # container oid -> [count, its owner node]
        self.contains: list | None = None        # [(oid, owner_node)] refs in the value
        self.copies: set | None = None           # other nodes that pulled a copy


class ObjEntry:
    """An object owned by one of this node's clients (and what keeps it alive: ``refs``)."""

    __slots__ = ("state", "inline", "node", "size", "lineage", "waiters", "owner_client",
                 "owner_holds", "rc", "lineage_holds", "holds_deps")

    def __init__(self, owner_client: bytes, lineage: TaskSpec | None = None):
        self.state = ObjState.PENDING
        self.inline: bytes | None = None
        self.node: bytes | None = None
        self.size = 0
        self.lineage = lineage
        self.waiters: list = []
        self.owner_client = owner_client
        self.owner_holds = True          # the owning client still has a ref
        self.rc: RefState | None = None
        # live objects here whose task took this one as an argument: while any is, this
        # one's lineage stays (its value may go: state FREED), so they can be rebuilt
        self.lineage_holds = 0
        self.holds_deps = False          # this object counts in its arguments' holds

    def refstate(self) -> RefState:
        rc = self.rc
        if rc is None:
            rc = self.rc = RefState()
        return rc

    def info(self) -> tuple:
        """Where the value is, as ``messages`` object info."""
        if self.state is ObjState.ERROR:
            return (m.ERROR, self.inline)
        if self.inline is not None:
            return (m.INLINE, self.inline)
        return (m.AT_NODE, self.node, self.size)


def _args_refs(spec: TaskSpec):
    """The refs a task's arguments hold: top-level, then nested."""
    return (*spec.deps, *spec.nested) if spec.nested else spec.deps


def unheld(e: ObjEntry) -> bool:
    """Neither its owning client, a borrower nor a container holds it."""
    rc = e.rc
    return not e.owner_holds and (rc is None or (not rc.borrowers and not rc.contained_in))


class ObjectManager:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_objects(self) -> None:
        self.objects: dict[bytes, ObjEntry] = {}
        self.remote_wants: dict[bytes, list] = {}   # oid -> callbacks waiting for remote info
        self.pulls: dict[bytes, asyncio.Future] = {}
        self.refused_puts: set[bytes] = set()   # raw puts the store had no room for
        self.bulk = None                        # ``bulk.BulkClient`` (set by the node)
        self.bulk_port = 0                      # this node's bulk server (0: none)
        self.bulk_ports: dict[bytes, int] = {}  # peers' bulk ports, asked once each
        # the id prefixes of local processes that exited (their objects went with them)
        self.exited_owners = BoundedSet(maxlen=10_000)
        self.freed_lineage: dict[bytes, int] = {}   # FREED entries, oldest first -> arg bytes
        self.freed_lineage_bytes = 0
        self._bulk_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="strato-pull")

    # ------------------------------------------------------------------ from clients
    def on_put(self, client, msg) -> None:
        oid, inline, size = msg[1], msg[2], msg[3]
        contained = msg[4] if len(msg) > 4 else None
        entry = ObjEntry(client.client_id)
        if contained:
            entry.refstate().contains = contained
            self._contains(oid, self.node_id, contained)
        entry.state = ObjState.READY
        entry.size = size
        if inline is not None:
            entry.inline = inline
        elif oid in self.refused_puts or not self.store.sealed(oid, size):
            # no room in memory nor spill space: the owner learns it now, its get raises
            self.refused_puts.discard(oid)
            entry.state = ObjState.ERROR
            entry.inline = error_bytes(ObjectStoreFullError(self.store.full_message(size)))
            client.conn.send((m.OBJ, oid, m.ERROR, entry.inline))
        else:
            entry.node = self.node_id
        self.objects[oid] = entry

    def _account_results(self, returns: list) -> list:
        """Results a worker wrote into this node's store count against it like puts (and
        spill like them); one that fits neither memory nor spill space becomes an
        ``ObjectStoreFullError`` for its owner."""
        out = returns
        for i, ret in enumerate(returns):
            if ret.inline is None and ret.node == self.node_id and not ret.error \
                    and not self.store.sealed(ret.oid, ret.size):
                data = error_bytes(ObjectStoreFullError(self.store.full_message(ret.size)))
                if out is returns:
                    out = list(returns)
                out[i] = ReturnValue(ret.oid, data, None, len(data), True)
                if ret.contained:
                    self._release_contained(ret.oid, ret.contained)
        return out

    def _discard_returns(self, returns: list) -> None:
        """Results nobody will keep (a retry follows, or nobody waits): the refs inside
        them are held by them no more."""
        for ret in returns:
            if ret.contained:
                self._release_contained(ret.oid, ret.contained)

    def on_want(self, client, msg) -> None:
        for oid, owner_node in msg[1]:
            self._want(oid, owner_node,
                       lambda info, c=client, o=oid, n=owner_node: self._deliver(c, o, info, n))

    def _deliver(self, client, oid: bytes, info: tuple, owner_node: bytes | None = None,
                 attempt: int = 0) -> None:
        """Give a client an object: inline bytes, error, or once it is in the local store.

        A pull that fails (its node died or stalled) asks the owner again after a pause:
        by then the owner knows, and rebuilds the object by lineage or names another copy."""
        where = info[0]
        if where == m.AT_NODE and info[1] != self.node_id:
            def pulled(ok, err=None):
                if ok:
                    self._deliver(client, oid, (m.AT_NODE, self.node_id, info[2]))
                elif owner_node is not None and attempt < PULL_RETRIES \
                        and not getattr(client.conn, "closed", False):
                    self.loop.call_later(0.5 * 2 ** attempt, self._want, oid, owner_node,
                                         lambda i: self._deliver(client, oid, i, owner_node,
                                                                 attempt + 1))
                else:
                    client.conn.send((m.OBJ, oid, m.ERROR, err))
            self._pull(oid, info[1], info[2], pulled, owner_node)
            return
        if where == m.AT_NODE and client.remote:
            self._deliver_remote(client, oid, info, owner_node)
            return
        if where == m.AT_NODE:
            client.conn.send((m.OBJ, oid, m.LOCAL, None))
        else:
            client.conn.send((m.OBJ, oid, where, info[1]))

    # ------------------------------------------------------------------ from peers
    def on_obj_want(self, node: bytes, msg) -> None:
        _, oid, requester = msg
        self._want(oid, self.node_id,
                   lambda info: self.peers.send(requester, (m.OBJ_INFO, oid, info)))

    def on_obj_info(self, node: bytes, msg) -> None:
        _, oid, info = msg
        for cb in self.remote_wants.pop(oid, []):
            cb(info)

    def on_pull_chunk(self, reply, msg) -> None:
        _, oid, offset, length = msg
        mm = self.store.open(oid)
        if mm is None:
            reply((False, "object not in store"))
        else:
            reply((True, bytes(mm[offset:offset + length])))
            mm.close()

    def on_bulk_port(self, reply, msg) -> None:
        reply(self.bulk_port)

    def on_free_copies(self, node: bytes, msg) -> None:
        for oid in msg[1]:
            self.store.delete(oid)

    # ------------------------------------------------------------------ ownership
    def _want(self, oid: bytes, owner_node: bytes, callback) -> None:
        """Call ``callback(info)`` once the object's value or location is known."""
        entry = self.objects.get(oid)
        if entry is not None:
            if entry.state is ObjState.READY or entry.state is ObjState.ERROR:
                callback(entry.info())
            elif entry.state is ObjState.LOST or entry.state is ObjState.FREED:
                self._reconstruct_or_fail(oid, entry, callback)
            else:
                entry.waiters.append(callback)
            return
        if oid in self.store:
            callback((m.AT_NODE, self.node_id, self.store.size_of(oid)))
            return
        if owner_node == self.node_id:
            if oid[:8] in self.exited_owners:
                callback((m.ERROR, error_bytes(OwnerDiedError(
                    f"object {oid.hex()} was lost: the worker or driver process that "
                    "owned it (that put it, or called the task that made it) exited, "
                    "and an object goes with its owner, as in Ray; return the value "
                    "itself rather than a ref made inside the task to keep it"))))
            else:
                callback((m.ERROR, error_bytes(ObjectLostError(
                    f"object {oid.hex()} is unknown (freed or never created)"))))
            return
        if owner_node not in self.view and owner_node in self.dead_nodes():
            callback((m.ERROR, error_bytes(OwnerDiedError(
                f"object {oid.hex()} lost: its owner's node {owner_node.hex()[:8]} died"))))
            return
        waiters = self.remote_wants.setdefault(oid, [])
        waiters.append(callback)
        if len(waiters) == 1:
            self.peers.send(owner_node, (m.OBJ_WANT, oid, self.node_id))

    def _set_ready(self, oid: bytes, ret: ReturnValue) -> None:
        entry = self.objects.get(oid)
        if entry is None or entry.state is ObjState.FREED:
            # freed already (or only its lineage kept): drop stored copy
            if ret.node is not None:
                self._delete_copy(oid, ret.node)
            if ret.contained:
                self._release_contained(oid, ret.contained)
            return
        rc = entry.rc
        old = rc.contains if rc is not None else None
        if ret.contained or old:
            entry.refstate().contains = ret.contained
            if old:   # an earlier run's value (rebuilt by lineage): its refs go
                self._release_contained(oid, old)
        entry.size = ret.size
        entry.inline = ret.inline
        entry.node = ret.node
        entry.state = ObjState.ERROR if ret.error else ObjState.READY
        waiters, entry.waiters = entry.waiters, []
        info = entry.info()
        for cb in waiters:
            cb(info)
        if oid in self.durable:
            self._durable_finished(oid)

    def _free_owned(self, oid: bytes) -> None:
        """Free an owned object now (every copy), and release the refs its value holds,
        which may free those in turn: a loop, not a recursion, however deep the nesting."""
        pending = self._freeing
        if pending is not None:
            pending.append(oid)   # an outer call is freeing: it takes this one too
            return
        self._freeing = pending = []
        try:
            self._free_one(oid)
            while pending:
                self._free_one(pending.pop())
        finally:
            self._freeing = None

    def _free_one(self, oid: bytes) -> None:
        """``_free_owned`` inside its loop: frees it may cause join the loop. An object
        whose lineage a live dependent holds loses only its value (state FREED)."""
        entry = self.objects.get(oid)
        if entry is None:
            return
        if entry.lineage_holds > 0:
            if entry.state is not ObjState.FREED:
                self._drop_value(oid, entry)
                self._keep_lineage(oid, entry)
            return
        del self.objects[oid]
        if entry.state is ObjState.FREED:
            self._unkeep_lineage(oid)
        else:
            self._drop_value(oid, entry)
        if entry.holds_deps:
            self._release_lineage(entry.lineage)

    def _drop_value(self, oid: bytes, entry: ObjEntry) -> None:
        """Delete every copy of the value, and release the refs it holds."""
        node = entry.node
        rc = entry.rc
        if node is not None:
            self._delete_copy(oid, node)
            if node != self.node_id and oid in self.store:
                self.store.delete(oid)   # a copy pulled here for this node's clients
            if rc is not None and rc.copies:
                for other in rc.copies:
                    self._delete_copy(oid, other)
        if rc is not None and rc.contains:
            self._release_contained(oid, rc.contains)

    # ------------------------------------------------------------------ lineage
    def _hold_lineage(self, spec: TaskSpec) -> None:
        """A task was submitted here: each of its results holds the lineage of the
        arguments it takes that are owned here and can be rebuilt (made by a task)."""
        if spec.kind != TASK:
            return                    # (an actor call's result is never rebuilt)
        objects = self.objects
        held = False
        for oid, owner in _args_refs(spec):
            if owner == self.node_id:
                e = objects.get(oid)
                if e is not None and e.lineage is not None and e.lineage.kind == TASK:
                    e.lineage_holds += len(spec.return_ids)
                    held = True
        if held:
            for oid in spec.return_ids:
                objects[oid].holds_deps = True

    def _release_lineage(self, spec: TaskSpec) -> None:
        """One result of ``spec`` is gone: its arguments' lineage is held once less;
        those freed already go for good when nothing holds them (inside the free loop)."""
        objects = self.objects
        for oid, owner in _args_refs(spec):
            if owner == self.node_id:
                e = objects.get(oid)
                if e is not None and e.lineage_holds > 0:
                    e.lineage_holds -= 1
                    if e.lineage_holds == 0 and unheld(e):
                        self._free_owned(oid)

    def _keep_lineage(self, oid: bytes, entry: ObjEntry) -> None:
        """``oid``'s value went; its lineage stays, within the LINEAGE_* bounds."""
        entry.state = ObjState.FREED
        entry.node = None
        entry.inline = None
        entry.size = 0
        entry.rc = None
        entry.owner_holds = False
        size = len(entry.lineage.args) if entry.lineage is not None else 0
        self.freed_lineage[oid] = size
        self.freed_lineage_bytes += size
        kept = self.freed_lineage
        while kept and (len(kept) > LINEAGE_KEPT
                        or self.freed_lineage_bytes > LINEAGE_BYTES_KEPT):
            oldest = next(iter(kept))
            self._unkeep_lineage(oldest)
            old = self.objects.get(oldest)
            if old is not None and old.state is ObjState.FREED:
                old.lineage_holds = 0   # its dependents can no longer be rebuilt through it
                self._free_owned(oldest)   # (queued: we are inside the free loop)

    def _unkeep_lineage(self, oid: bytes) -> None:
        """``oid`` leaves the kept lineage (rebuilt, or freed for good)."""
        self.freed_lineage_bytes -= self.freed_lineage.pop(oid, 0)

    def _drop_rebuilt_args(self, spec: TaskSpec) -> None:
        """A task finished: an argument that was rebuilt only for it (nobody holds it,
        its lineage is held) loses its value again."""
        objects = self.objects
        for oid, owner in _args_refs(spec):
            if owner == self.node_id:
                e = objects.get(oid)
                if e is not None and e.lineage_holds > 0 and unheld(e) \
                        and (e.state is ObjState.READY or e.state is ObjState.ERROR) \
                        and not self._an_unfinished_task_takes(oid):
                    self._free_owned(oid)

    def _an_unfinished_task_takes(self, oid: bytes) -> bool:
        """(Rare: only for a value rebuilt for its dependents; two of them may be rebuilt
        at once, and the second must still find it.)"""
        return any(any(o == oid for o, _n in _args_refs(spec))
                   for spec, _where in self.owned_tasks.values())

    def _delete_copy(self, oid: bytes, node: bytes) -> None:
        if node == self.node_id:
            self.store.delete(oid)
        elif self.peers:
            self.peers.send(node, (m.FREE_COPIES, [oid]))

    def _free_client_objects(self, client_id: bytes) -> None:
        for oid, entry in list(self.objects.items()):
            if entry.owner_client == client_id:
                self._free_owned(oid)

    def _objects_lost_with(self, node: bytes) -> None:
        for oid, entry in self.objects.items():
            copies = entry.rc.copies if entry.rc is not None else None
            if copies:
                copies.discard(node)
            if entry.node == node and entry.state is ObjState.READY:
                if oid in self.store:       # a copy here: it becomes the primary
                    entry.node = self.node_id
                elif copies:                # a copy on another node: that one
                    entry.node = copies.pop()
                else:
                    entry.state = ObjState.LOST
                    entry.node = None

    def _reconstruct_or_fail(self, oid: bytes, entry: ObjEntry, callback) -> None:
        spec = entry.lineage
        if spec is None or spec.kind != TASK:
            callback((m.ERROR, error_bytes(ObjectLostError(
                f"object {oid.hex()} was lost with its node and cannot be rebuilt "
                "(made by put or an actor)"))))
            return
        entry.waiters.append(callback)
        if entry.state is ObjState.FREED:
            self._unkeep_lineage(oid)
        entry.state = ObjState.PENDING
        if spec.task_id in self.owned_tasks:
            return  # already re-running
        for other in spec.return_ids:
            e = self.objects.get(other)
            if e is not None and e.state is not ObjState.FREED:   # (those stay freed)
                e.state = ObjState.PENDING
        spec.dep_values = None
        self.owned_tasks[spec.task_id] = (spec, None)
        self._resolve_then_place(spec)

    def _copy_made(self, oid: bytes, owner: bytes | None) -> None:
        """A copy was pulled here: its owner frees it with the object. (A copy whose
        owner is unknown stays until this node stops, as every copy did before.)"""
        if owner is None or owner == self.node_id:
            if owner is not None and oid not in self.objects:
                self.store.delete(oid)   # freed while the pull ran (a client waiting
                                         # holds a ref, so this is nobody's)
            return
        self.peers.send(owner, (m.OBJ_COPY, oid, self.node_id))

    # ------------------------------------------------------------------ transfer
    def _pull(self, oid: bytes, node: bytes, size: int, done,
              owner: bytes | None = None) -> None:
        """Fetch a remote object into the local store in chunks, a bounded window at once;
        its ``owner`` learns of the copy (OBJ_COPY) and frees it with the object."""
        if oid in self.store:
            done(True)
            return
        fut = self.pulls.get(oid)
        if fut is None:
            fut = self.loop.create_future()
            self.pulls[oid] = fut
            self.loop.create_task(self._run_pull(oid, node, size, fut, owner))

        def _finished(f):
            exc = f.exception()
            done(exc is None, None if exc is None else error_bytes(exc))
        fut.add_done_callback(_finished)

    async def _bulk_port_of(self, node: bytes) -> int:
        port = self.bulk_ports.get(node)
        if port is None:
            port = await self.peers.request(node, (m.BULK_PORT,), timeout=PULL_CHUNK_TIMEOUT)
            self.bulk_ports[node] = port
        return port

    async def _run_pull(self, oid: bytes, node: bytes, size: int, fut,
                        owner: bytes | None = None) -> None:
        fd, tmp = self.store.new_file(oid, size)
        pending: dict[int, asyncio.Future] = {}
        try:
            address = self.peers.addresses.get(node)
            port = await self._bulk_port_of(node) if self.bulk and address else 0
            if port:
                # big objects in two streams at once: both ends encrypt and decrypt on
                # two threads (OpenSSL releases the GIL)
                half = size // 2 if size >= BULK_SPLIT else size
                parts = [(0, half), (half, size - half)] if half < size else [(0, size)]
                host = address.rsplit(":", 1)[0]
                try:
                    await asyncio.gather(*(self.loop.run_in_executor(
                        self._bulk_pool, self.bulk.fetch_into, node, host, port, oid, fd,
                        size, start, length) for start, length in parts))
                except ConnectionError as exc:
                    raise ObjectLostError(f"object {oid.hex()} could not be fetched from "
                                          f"node {node.hex()[:8]}: {exc}") from None
            offsets = [] if port else (list(range(0, size, CHUNK)) or [0])
            nxt = 0
            while nxt < len(offsets) or pending:
                while nxt < len(offsets) and len(pending) < PULL_WINDOW:
                    off = offsets[nxt]
                    nxt += 1
                    pending[off] = self.peers.request(node, (m.PULL_CHUNK, oid, off, CHUNK),
                                                      timeout=PULL_CHUNK_TIMEOUT)
                done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
                for off in [o for o, f in pending.items() if f in done]:
                    ok, data = pending.pop(off).result()
                    if not ok:
                        raise ObjectLostError(f"object {oid.hex()} could not be fetched from node "
                                              f"{node.hex()[:8]}: {data}")
                    os.pwrite(fd, data, off)
            os.close(fd)
            fd = -1
            if not self.store.finish_file(oid, tmp, size):
                raise ObjectStoreFullError(self.store.full_message(size))
            self._copy_made(oid, owner)
            fut.set_result(True)
        except Exception as exc:
            for other in pending.values():
                other.cancel()
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
