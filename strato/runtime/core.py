"""The core worker embedded in drivers and workers: submits work, owns the refs it
creates, and resolves refs to values (inline, zero-copy from the local store, or pulled
by the agent from another node). Its half of reference counting is ``core_refs``.
"""

from __future__ import annotations

import operator
import os
import socket
import threading
import time
from collections.abc import Callable

from strato.exceptions import (
    GetTimeoutError,
    HeadUnreachableError,
    ObjectLostError,
    RuntimeNotInitializedError,
    StratoError,
    TaskError,
)
from strato.runtime import messages as m
from strato.runtime import serialization
from strato.runtime.core_refs import RefCounting
from strato.runtime.direct import DirectCalling
from strato.runtime.ids import IdFactory
from strato.runtime.leases import TaskLeasing
from strato.runtime.messages import AT_NODE, ERROR, INLINE, LOCAL, OBJ, RESULT, RPC_REPLY
from strato.runtime.protocol.framing import FrameClient
from strato.runtime.serialization import deserialize, serialize
from strato.runtime.spec import INLINE_MAX
from strato.runtime.store import FilePool, read_object, write_object

_current: CoreWorker | None = None
_TO_EXECUTOR = frozenset((m.EXEC, m.ACTOR_INIT, m.CANCEL_EXEC, m.CHECKPOINT, m.FORGET_FNS))  # worker only


def current() -> CoreWorker | None:
    return _current


def require_current() -> CoreWorker:
    """This process's connection, or a clear error when ``init`` was not called."""
    if _current is None:
        raise RuntimeNotInitializedError("strato is not initialized: call strato.init() first")
    return _current


def set_current(core: CoreWorker | None) -> None:
    global _current
    _current = core


class _GoneFromStore(Exception):
    """A value's file is not in the local store where this process thought it was."""

    def __init__(self, oid: bytes):
        super().__init__(oid.hex())
        self.oid = oid


class ObjectRef:
    """A reference to a value that a task produced or ``put`` stored."""

    __slots__ = ("id", "owner_node", "__weakref__")

    def __init__(self, oid: bytes, owner_node: bytes):
        self.id = oid
        self.owner_node = owner_node
        core = _current
        if core is not None:
            counts = core.refcounts
            counts[oid] = counts.get(oid, 0) + 1

    def __del__(self):
        core = _current
        if core is None:
            return
        try:
            counts = core.refcounts
            n = counts.get(self.id, 0) - 1
            if n > 0:
                counts[self.id] = n
            else:
                counts.pop(self.id, None)
                core.release(self.id)
        except Exception:
            pass

    def __reduce__(self):
        if not serialization.note_serialized_ref(self):
            # pickled outside serialize() (a closure, the user's own pickle): the runtime
            # cannot follow where it goes, so this process keeps the object alive for good
            core = _current
            if core is not None:
                core.keep_forever([self])
        return (_rebuild_ref, (self.id, self.owner_node))

    def __copy__(self) -> ObjectRef:
        return ObjectRef(self.id, self.owner_node)   # one more local ref, nothing leaves

    def __deepcopy__(self, memo) -> ObjectRef:
        return ObjectRef(self.id, self.owner_node)

    def __repr__(self) -> str:
        return f"ObjectRef({self.id.hex()})"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def hex(self) -> str:
        return self.id.hex()

    def task_id(self) -> bytes:
        return self.id

    def future(self):
        """A concurrent.futures.Future resolved with the value (like Ray's ref.future())."""
        import concurrent.futures
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(_current.get([self], None)[0])
            except BaseException as exc:
                fut.set_exception(exc)
        threading.Thread(target=run, daemon=True).start()
        return fut

    def __await__(self):
        import asyncio
        return asyncio.wrap_future(self.future()).__await__()


_ref_id = operator.attrgetter("id")
_kind = operator.itemgetter(0)


class UncountedRef(ObjectRef):
    """A ref the runtime makes for one read of its own (a working dir's package): not
    counted, so it never releases a count that a user's ref of the same object holds;
    at its end it only drops the value it read, unless a counted ref still holds it."""

    __slots__ = ()

    def __init__(self, oid: bytes, owner_node: bytes):
        self.id = oid
        self.owner_node = owner_node

    def __del__(self):
        core = _current
        if core is not None and self.id not in core.refcounts:
            core.forget_value(self.id)


def _rebuild_ref(oid: bytes, owner_node: bytes) -> ObjectRef:
    """A ref unpickled with no cover (a plain pickle): registered as a borrow at once."""
    ref = ObjectRef(oid, owner_node)
    core = _current
    if core is not None:
        core.borrow(oid, owner_node)
    return ref


RefCounting.ref_class = ObjectRef   # what refs rebuilt from values are made of


class CoreWorker(RefCounting, DirectCalling, TaskLeasing):
    remote = False     # a remote driver (``strato.runtime.remote``) cannot map the store

    def __init__(self, socket_path: str | None, role: str, worker_id: bytes = b"", *,
                 sock: socket.socket | None = None, direct_path: str | None = None):
        self.role = role
        self._worker_id = worker_id
        self.client_id = os.urandom(16)
        self.ids = IdFactory(self.client_id[:8])
        self.refcounts: dict[bytes, int] = {}
        self.values: dict[bytes, tuple] = {}
        self.owned: set[bytes] = set()
        self.escaped: set[bytes] = set()        # owned, serialized: others may hold it
        self.borrowed: dict[bytes, bytes] = {}  # not owned, registered: oid -> owner node
        self.covers: dict = {}                  # value oid | task key -> {oid: owner_node}
        self._forever: list = []                # refs kept for this process's life
        self.pinned: dict[bytes, list] = {}     # task id -> arg refs kept alive until done
        self.task_of: dict[bytes, bytes] = {}   # return oid -> task id (for pinned args)
        self.wanted: set[bytes] = set()
        # ids in ``values`` at another node (must be pulled before a local read): wait()
        # on ready refs checks them with set operations (may hold ids since gone)
        self.far: set[bytes] = set()
        self.recyclable: dict[bytes, int] = {}  # put by us, never shared or read: oid -> size
        # reference-counting ops not sent yet, in order (never rebound: appends need no
        # lock; _take_ops cuts a prefix under the connection's send lock)
        self._ops: list = []
        self._flush_armed = False
        self._flush_wanted = threading.Event()
        self.cond = threading.Condition()
        self.rpc_replies: dict[int, tuple] = {}
        self._rpc_seq = 0
        self.exported: set[bytes] = set()
        self.on_exec: Callable | None = None      # set by the worker process
        self.on_block: Callable | None = None
        self.log_handler: Callable | None = None
        self.warn_handler: Callable | None = None
        self.closed = False
        self._exec_lock = threading.Lock()
        self._early: list = []   # work that arrived before the executor was attached
        self.runtime_env: dict | None = None   # given to every task this driver submits
        self._init_direct()
        self._init_leases()
        self._direct_path = direct_path   # a worker's (told in HELLO)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(socket_path)
        self._welcome = threading.Event()
        self.conn = self._open(sock)
        if not self._welcome.wait(30):
            raise StratoError(f"the node agent at {socket_path or 'the client endpoint'} "
                              "did not answer")
        threading.Thread(target=self._flusher, name="strato-refs", daemon=True).start()

    def _open(self, sock: socket.socket) -> FrameClient:
        conn = FrameClient(sock, self._on_batch, self._on_close)
        conn.start()
        hello = (m.HELLO, self.role, self.client_id, None, self._worker_id)
        conn.send(hello if self._direct_path is None else (*hello, self._direct_path))
        conn.prefix = self._take_ops   # after HELLO, which must come first
        return conn

    # ------------------------------------------------------------------ incoming
    def _on_batch(self, batch: list) -> None:
        notify = False
        for msg in batch:
            kind = msg[0]
            if kind == RESULT:
                values = self.values
                for ret in msg[1]:
                    if ret.oid not in self.owned:
                        continue
                    if ret.error:
                        values[ret.oid] = (ERROR, ret.inline)
                    elif ret.inline is not None:
                        values[ret.oid] = (INLINE, ret.inline)
                    else:
                        values[ret.oid] = (AT_NODE, ret.node, ret.size)
                        if ret.node != self.local_node:
                            self.far.add(ret.oid)
                    tid = self.task_of.pop(ret.oid, None)
                    if tid is not None:
                        self.pinned.pop(tid, None)
                if self.agent_call_of:
                    self._agent_call_done(msg[1])
                notify = True
            elif kind == OBJ:
                _, oid, how, payload = msg
                self.wanted.discard(oid)
                self.far.discard(oid)
                if how == LOCAL:
                    self.values[oid] = (AT_NODE, self.node_id, 0)
                else:
                    self.values[oid] = (how, payload)
                notify = True
            elif kind in _TO_EXECUTOR:
                handler = self.on_exec
                if handler is None:
                    with self._exec_lock:
                        handler = self.on_exec
                        if handler is None:
                            self._early.append(msg)
                            continue
                handler(msg)
            elif kind == RPC_REPLY:
                _, rid, ok, value = msg
                self.rpc_replies[rid] = (ok, value)
                notify = True
            elif kind == m.LOG:
                if self.log_handler:
                    self.log_handler(msg[1])
            elif kind == m.WARN:
                if self.warn_handler:
                    self.warn_handler(msg[1])
            elif kind == m.WELCOME:
                _, self.node_id, shm_dir, spill_dir, self.agent_address = msg
                # the node whose store this process maps (none for a remote driver)
                self.local_node = None if self.remote else self.node_id
                self.store_paths = (shm_dir, spill_dir)
                self.pool = FilePool(shm_dir)
                self.job_id = self.node_id + self.client_id
                self._welcome.set()
            elif kind == m.ACTOR_HERE:
                self._on_actor_here(msg)
            elif kind == m.LEASE:
                self._on_lease(msg)
            elif kind == m.LEASE_REVOKE:
                self._on_lease_revoke(msg)
            elif kind == m.RESUMED:
                self._on_resumed(msg[1], msg[2])
                notify = True
        if notify:
            with self.cond:
                self.cond.notify_all()

    def _on_close(self) -> None:
        self.closed = True
        with self.cond:
            self.cond.notify_all()
        if self.role == "worker":
            os._exit(1)

    def _on_resumed(self, ready: list, pending: list) -> None:
        """Overridden by remote drivers, the only ones that resume a session."""

    def set_exec_handler(self, handler: Callable) -> None:
        with self._exec_lock:
            self.on_exec = handler
            early, self._early = self._early, []
        for msg in early:
            handler(msg)

    # ------------------------------------------------------------------ outgoing
    def send(self, msg) -> None:
        self.conn.send(msg)    # pending reference-counting ops go first (_take_ops)

    def export_function(self, fn_id: bytes, blob: bytes) -> None:
        if fn_id not in self.exported:
            self.exported.add(fn_id)
            self.fn_blobs[fn_id] = blob      # (a leased worker gets it from here)
            self.send((m.FN, fn_id, blob))

    def new_return_ids(self, n: int, task_id: bytes) -> list[bytes]:
        """The first return id is the task id itself, so ``cancel(ref)`` finds the task."""
        self.owned.add(task_id)
        ids = [task_id]
        for _ in range(n - 1):
            oid = self.ids.next()
            self.owned.add(oid)
            ids.append(oid)
        return ids

    # ------------------------------------------------------------------ objects
    def _serialize_for_put(self, value):
        """A new owned id, the serialized value and the refs it holds, as PUT names them
        (the object keeps them alive until it is freed itself)."""
        if isinstance(value, ObjectRef):
            raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself")
        oid = self.ids.next()
        try:
            sv = serialize(value)
        except Exception as exc:
            raise TypeError(f"put() could not serialize the value: {exc}") from exc
        contained = None
        if sv.contained_refs:
            self.mark_escaped(sv.contained_refs)
            contained = ref_pairs(sv.contained_refs)
        self.owned.add(oid)
        return oid, sv, contained

    def put(self, value) -> ObjectRef:
        oid, sv, contained = self._serialize_for_put(value)
        if sv.total_size <= INLINE_MAX:
            data = sv.to_bytes()
            self.values[oid] = (INLINE, data)
            self.send((m.PUT, oid, data, len(data), contained))
        else:
            size = write_object(self.store_paths[0], oid, sv, self.pool.take(sv.total_size))
            self.values[oid] = (AT_NODE, self.node_id, size)
            self.recyclable[oid] = size
            self.send((m.PUT, oid, None, size, contained))
        return ObjectRef(oid, self.node_id)

    def _is_ready(self, oid: bytes) -> bool:
        v = self.values.get(oid)
        return v is not None and (v[0] != AT_NODE or v[1] == self.local_node)

    def _request_missing(self, refs, need_local: bool) -> None:
        want = []
        for ref in refs:
            oid = ref.id
            v = self.values.get(oid)
            if v is None:
                if oid in self.owned or oid in self.wanted:
                    continue
            elif not need_local or not self._unpulled(oid, v):
                continue
            self.wanted.add(oid)
            want.append((oid, ref.owner_node))
        if want:
            self.send((m.WANT, want))

    def _unpulled(self, oid: bytes, v: tuple) -> bool:
        """The value is on another node and no pull of it was asked for."""
        return v[0] == AT_NODE and v[1] != self.local_node and oid not in self.wanted

    def _unrequested(self, refs) -> bool:
        """Some ref's value is on another node and no pull of it was asked for."""
        if not self.far and self.local_node is not None:
            return False
        values = self.values
        for ref in refs:
            v = values.get(ref.id)
            if v is not None and self._unpulled(ref.id, v):
                return True
        return False

    def get(self, refs: list, timeout: float | None, cover=None,
            _asked_again: frozenset = frozenset()) -> list:
        """``cover``: the key that covers refs inside the values (default: each value's
        own oid, so they stay covered while the caller holds that ref)."""
        values = self.values
        if not all(self._is_ready(r.id) for r in refs):
            if len(refs) != 1 or not self.pending_chan \
                    or not self.read_direct(refs[0].id, timeout):
                self._wait_ready(refs, len(refs), timeout, need_local=True,
                                 raise_on_timeout=True)
        try:
            return [self._decode(r.id, values[r.id], cover) for r in refs]
        except _GoneFromStore as gone:
            if gone.oid in _asked_again:
                raise ObjectLostError(f"object {gone.oid.hex()} is gone from the local "
                                      "store") from None
            # the location this process knew is stale (the object was freed, say with
            # its owner): ask the agent again, which knows what became of it
            self.forget_value(gone.oid)
            self.wanted.discard(gone.oid)
            return self.get(refs, timeout, cover, _asked_again | {gone.oid})

    def _wait_ready(self, refs, num: int, timeout: float | None, need_local: bool,
                    raise_on_timeout: bool = False) -> list:
        if self._ops:
            self.conn.try_flush()
        self._request_missing(refs, need_local)
        check = self._is_ready if need_local else (lambda oid: oid in self.values)
        deadline = None if timeout is None else time.monotonic() + timeout
        blocked = False
        # the refs not ready yet: each wakeup looks only at those (a get of 1,000 refs
        # wakes many times as their results come)
        pending = refs
        try:
            while True:
                with self.cond:
                    pending = [r for r in pending if not check(r.id)]
                    if len(refs) - len(pending) >= num:
                        return [r for r in refs if check(r.id)]
                    if self.closed:
                        raise StratoError("lost the connection to the node agent")
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            if raise_on_timeout:
                                raise GetTimeoutError(
                                    f"get timed out after {timeout}s: {len(pending)} of "
                                    f"{len(refs)} objects not ready")
                            return [r for r in refs if check(r.id)]
                    else:
                        remaining = None
                    if not blocked and self.on_block is not None:
                        blocked = True
                        self.on_block(True)
                    # an object that arrived as "on another node" since the last request
                    # (its notify may have come before this thread waited): ask for a
                    # pull now, not after a wakeup that may never come
                    pull = need_local and self._unrequested(pending)
                    chan = None
                    if not pull and self.pending_chan:
                        chan = self.channel_to_read(pending)
                    if chan is None and not pull:
                        self.cond.wait(remaining if remaining is None else min(remaining, 1.0))
                if pull:
                    self._request_missing(refs, need_local)
                    continue
                if chan is None:
                    continue
                # results of direct calls among them: read their channel on this thread
                # (holding its token, not the condition)
                try:
                    chan.pump(1.0 if remaining is None else min(remaining, 1.0))
                finally:
                    self.release_channel(chan)
        finally:
            if blocked:
                self.on_block(False)

    def _decode(self, oid: bytes, v: tuple, cover=None):
        kind = v[0]
        if kind == INLINE:
            value = deserialize(v[1], self._rebuilder, cover or oid)
            if cover is None and oid in self.covers:
                self.covers[oid][None] = None   # every ref of it noted (see _rebuilder)
            return value
        if kind == AT_NODE:
            self.recyclable.pop(oid, None)  # a zero-copy view may now outlive the ref
            try:
                value = read_object(self.store_paths, oid, self._rebuilder, cover or oid)
                if cover is None and oid in self.covers:
                    self.covers[oid][None] = None
                return value
            except FileNotFoundError:
                raise _GoneFromStore(oid) from None
        if kind == ERROR:
            err = deserialize(v[1])
            if isinstance(err, TaskError):
                raise err.as_instanceof_cause()
            raise err
        raise StratoError(f"unknown object state {kind}")

    def wait(self, refs: list, num_returns: int, timeout: float | None, fetch_local: bool,
             ids=None):
        """``ids``: the set of the refs' ids, when the caller has it already."""
        values, local = self.values, self.local_node
        # fastest path: every ref is ready (set operations at C speed, no per-ref Python)
        if ids is None:
            ids = set(map(_ref_id, refs))
        if local is not None:
            # (set minus dict: C lookups with the set's stored hashes, 30% under keys() >=)
            if not ids.difference(values) and (not fetch_local or ids.isdisjoint(self.far)):
                return refs[:num_returns], refs[num_returns:]
        else:   # a remote driver: every object in the store is far
            try:   # a missing value raises KeyError here
                got = operator.itemgetter(*ids)(values) if len(ids) > 1 \
                    else [values[next(iter(ids))]]
                kinds = set(map(_kind, got))
            except KeyError:
                kinds = None
            if kinds is not None and (not fetch_local or AT_NODE not in kinds):
                return refs[:num_returns], refs[num_returns:]
        # fast path: enough refs are ready already (one pass, stops at num_returns)
        done = []
        for i, r in enumerate(refs):
            v = values.get(r.id)
            if v is not None and (not fetch_local or v[0] != AT_NODE or v[1] == local):
                done.append(r)
                if len(done) == num_returns:
                    if i + 1 == len(done):     # a prefix of refs: no set needed
                        return done, refs[i + 1:]
                    ids = {d.id for d in done}
                    return done, [x for x in refs[:i + 1] if x.id not in ids] + refs[i + 1:]
        ready = self._wait_ready(refs, num_returns, timeout, need_local=fetch_local)
        ready_ids = {r.id for r in ready[:num_returns]} if len(ready) > num_returns else \
            {r.id for r in ready}
        done = [r for r in refs if r.id in ready_ids]
        rest = [r for r in refs if r.id not in ready_ids]
        return done, rest

    # ------------------------------------------------------------------ rpc
    def rpc(self, method: str, *args, timeout: float = 60.0):
        """Call ``rpc_<method>`` of the head (or ``_rpc_<method>`` of this node's agent).

        Raises ``HeadUnreachableError`` when the connection is lost, ``GetTimeoutError``
        when no answer comes in time, and the call's own error as itself."""
        with self.cond:
            self._rpc_seq += 1
            rid = self._rpc_seq
        self.send((m.RPC, rid, method, args))
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.rpc_replies:
                if self.closed or self.conn.closed:
                    raise HeadUnreachableError(
                        f"{method}: lost the connection to the node agent (the node, or "
                        "the head it runs, stopped)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GetTimeoutError(f"{method} got no answer within {timeout}s")
                self.cond.wait(remaining)
            ok, value = self.rpc_replies.pop(rid)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.closed = True         # (direct channels closing now send nothing)
        self._lease_wake.set()     # (its keeper thread ends)
        self.close_direct()
        self.flush_frees()
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.clear()
        self.closed = True
        self._flush_wanted.set()   # the flusher thread ends
        self.conn.close()


def ref_pairs(refs) -> list:
    """[(oid, owner_node)] of these refs, each object once."""
    return list({r.id: r.owner_node for r in refs}.items())
