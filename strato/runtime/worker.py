"""A worker process: runs tasks (and, when dedicated, one actor) its node agent sends.

Normal tasks run one at a time on the main thread; actors with ``max_concurrency`` run
calls on a thread pool, async actors on an event loop thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import cloudpickle

from strato.exceptions import ActorDiedError, TaskCancelledError, TaskError
from strato.runtime import context
from strato.runtime import messages as m
from strato.runtime.core import CoreWorker, ObjectRef, UncountedRef, ref_pairs, set_current
from strato.runtime.direct_host import DirectHost
from strato.runtime.serialization import deserialize, picklable, serialize
from strato.runtime.spec import ACTOR_CALL, INLINE_MAX, ArgRef, ReturnValue, TaskSpec
from strato.runtime.store import read_object, write_object
from strato.runtime.workdir import unpack_working_dir, working_dir_root


class Executor:
    def __init__(self, core: CoreWorker, host: DirectHost | None = None):
        self.core = core
        self.host = host         # direct calls, read by the main thread when idle
        self.functions: dict[bytes, object] = {}
        self.inbox: deque = deque()
        self.cond = threading.Condition()
        self.actor = None
        self.actor_spec: TaskSpec | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.async_loop: asyncio.AbstractEventLoop | None = None
        self.async_sem: asyncio.Semaphore | None = None
        self.running: TaskSpec | None = None
        self.cancelled: set[bytes] = set()
        self.gpu_ids: list = []
        self.blocked = False
        self.working_dir: str | None = None   # content hash of the one entered
        self.direct_reply: dict = {}          # task id -> caller's channel (direct calls)
        self.direct_fns: dict = {}            # caller's channel -> functions it sent
        self.agent_fns: set = set()           # functions the agent sent
        core.on_block = self.on_block
        core.set_exec_handler(self.on_message)

    # ------------------------------------------------------------------ from the agent
    def on_message(self, msg) -> None:
        kind = msg[0]
        if kind == m.EXEC:
            _, specs, fns, gpu_ids = msg
            for fid, blob in fns.items():
                if blob is not None and fid not in self.functions:
                    self.functions[fid] = blob
                self.agent_fns.add(fid)
            with self.cond:
                if self.blocked:
                    # sent before the agent saw we block: hand it back, it may be
                    # the very task we wait for
                    self.core.send((m.BOUNCE, [spec.task_id for spec in specs]))
                    return
                for spec in specs:
                    self.inbox.append((spec, gpu_ids))
                self._notify()
        elif kind == m.ACTOR_INIT:
            _, spec, blob, gpu_ids = msg
            if blob is not None:
                self.functions[spec.function_id] = blob
            with self.cond:
                self.inbox.append((spec, gpu_ids))
                self._notify()
        elif kind == m.FORGET_FNS:
            pinned = set().union(*self.direct_fns.values()) if self.direct_fns else ()
            for fid in msg[1]:   # the agent sends the blob again if a later task needs it
                self.agent_fns.discard(fid)
                if fid not in pinned:
                    self.functions.pop(fid, None)
        elif kind == m.CANCEL_EXEC:
            _, task_id = msg
            self.cancelled.add(task_id)
            with self.cond:
                queued = [item for item in self.inbox if item[0].task_id == task_id]
                for item in queued:
                    self.inbox.remove(item)
            for spec, _ in queued:  # not started yet: answer at once
                err = TaskCancelledError(f"task {spec.name} cancelled")
                self.done(spec, self.pack_error(spec, err), False)
                return
            if self.running is not None and self.running.task_id == task_id and self.actor is None:
                # a real signal: unlike interrupt_main() it also breaks a blocking sleep
                os.kill(os.getpid(), signal.SIGINT)
        elif kind == m.CHECKPOINT:
            hook = getattr(self.actor, "__strato_checkpoint__", None) or \
                getattr(self.actor, "checkpoint_on_drain", None)
            if hook is not None:
                threading.Thread(target=_safe_call, args=(hook,), daemon=True).start()

    def on_block(self, blocked: bool) -> None:
        """Tell the agent this worker waits in get(); hand back tasks not yet started."""
        if self.actor is not None:
            return
        with self.cond:
            self.blocked = blocked
            if blocked:
                # (direct calls stay: the agent does not know them)
                direct = self.direct_reply
                returned = [spec.task_id for spec, _ in self.inbox if spec.task_id not in direct]
                self.inbox = deque(item for item in self.inbox if item[0].task_id in direct)
                self.core.send((m.BLOCKED, returned))
            else:
                self.core.send((m.UNBLOCKED,))

    # ------------------------------------------------------------------ main loop
    def _notify(self) -> None:
        """Work was queued (under ``cond``): wake the main thread, in cond.wait or in
        the direct host's select."""
        self.cond.notify()
        if self.host is not None and self.host.waiting:
            self.host.wake()

    def _next(self) -> tuple:
        """The next (spec, gpu_ids) to run; while none, read direct callers (or wait)."""
        host = self.host
        while True:
            with self.cond:
                if self.inbox:
                    return self.inbox.popleft()
                if host is None:
                    self.cond.wait()
                    continue
                host.waiting = True   # from here a queued item pokes the host
            try:
                host.poll(self.on_direct_calls, self.on_direct_cancel, self.on_direct_gone)
            finally:
                host.waiting = False

    def run_forever(self) -> None:
        while True:
            spec, gpu_ids = self._next()
            self.gpu_ids = gpu_ids
            if spec.runtime_env is not None:
                self.enter_runtime_env(spec.runtime_env)
            if gpu_ids:
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
            if spec.kind == ACTOR_CALL:
                self.run_actor_call(spec)
            elif spec.actor_id is not None:
                self.init_actor(spec)
            else:
                returns = self.execute(spec, self.load(spec))
                self.done(spec, returns, self._retryable)

    def done(self, spec: TaskSpec, returns: list, retryable: bool) -> None:
        """Refs from the task's arguments it keeps become borrows, then DONE: the
        caller unpins the arguments only after the agent knows of them. A direct call's
        results go straight back to its caller (``runtime.direct``)."""
        self.core.uncover(_cover_key(spec))
        reply = self.direct_reply.pop(spec.task_id, None) if self.direct_reply else None
        if reply is None:
            self.core.send((m.DONE, spec.task_id, returns, retryable))
            return
        if any(r.inline is None or r.contained is not None for r in returns):
            # in the store or holding refs: the agent keeps it, and knows it before the
            # caller does (who may pass the ref on at once)
            returns = self.core.rpc("direct_results", spec.owner_client, returns)
        reply.send((m.RESULT, returns))

    def on_direct_calls(self, caller, specs: list, fns: dict | None) -> None:
        """Calls (or leased tasks) straight from a caller on this node: the same queue
        as the agent's. Functions that came with them are kept while it is connected
        (the agent's pruning never drops them: it did not send them)."""
        if fns:
            pinned = self.direct_fns.setdefault(caller, set())
            for fid, blob in fns.items():
                if blob is not None and fid not in self.functions:
                    self.functions[fid] = blob
                    pinned.add(fid)
        with self.cond:
            for spec in specs:
                self.direct_reply[spec.task_id] = caller
                self.inbox.append((spec, self.gpu_ids))
            self.cond.notify()   # (read on the main thread: nothing else to wake)

    def on_direct_gone(self, caller) -> None:
        """A caller disconnected: the functions only it sent go."""
        for fid in self.direct_fns.pop(caller, ()):
            if fid not in self.agent_fns:
                self.functions.pop(fid, None)

    def on_direct_cancel(self, task_id: bytes) -> None:
        self.on_message((m.CANCEL_EXEC, task_id))

    def enter_runtime_env(self, env: dict) -> None:
        """A client's ``working_dir``: unpacked once per node (fetched from the head's
        store by content hash), then on ``sys.path`` and the working directory."""
        wd = env.get("working_dir")
        if wd is None or wd[0] == self.working_dir:
            return
        pkg, oid, node = wd
        root = working_dir_root(os.environ.get("STRATO_NODE_TEMP_DIR", "/tmp"))
        path = os.path.join(root, pkg)
        if not os.path.isdir(path):
            zipped = self.core.get([UncountedRef(oid, node)], None)[0]
            path = unpack_working_dir(root, pkg, zipped)
        if self.working_dir is not None:
            old = os.path.join(root, self.working_dir)
            if old in sys.path:
                sys.path.remove(old)
        sys.path.insert(0, path)
        os.chdir(path)
        self.working_dir = pkg

    def load(self, spec: TaskSpec):
        fn = self.functions.get(spec.function_id)
        if isinstance(fn, bytes):
            fn = cloudpickle.loads(fn)
            self.functions[spec.function_id] = fn
        if fn is None:
            raise RuntimeError(f"function {spec.name} was never exported to this worker")
        return fn

    def resolve_args(self, spec: TaskSpec):
        """The call's arguments. Refs inside them are covered by the task (the caller
        pins them until it is done), see ``done``."""
        core = self.core
        key = _cover_key(spec)
        args, kwargs = deserialize(spec.args, core._rebuilder, key)
        if not spec.deps:
            return args, kwargs
        values = []
        need_get = []
        for i, (oid, _owner) in enumerate(spec.deps):
            info = spec.dep_values.get(oid) if spec.dep_values else None
            if info is None:
                need_get.append(i)
                values.append(None)
            elif info[0] == m.INLINE:
                values.append(deserialize(info[1], core._rebuilder, key))
            elif info[0] == m.AT_NODE:
                values.append(read_object(core.store_paths, oid, core._rebuilder, key))
            else:
                err = deserialize(info[1])
                raise err.as_instanceof_cause() if isinstance(err, TaskError) else err
        if need_get:
            refs = [ObjectRef(spec.deps[i][0], spec.deps[i][1]) for i in need_get]
            for i, v in zip(need_get, core.get(refs, None, cover=key)):
                values[i] = v
        args = [values[a.index] if isinstance(a, ArgRef) else a for a in args]
        kwargs = {k: values[v.index] if isinstance(v, ArgRef) else v for k, v in kwargs.items()}
        return args, kwargs

    def execute(self, spec: TaskSpec, fn) -> list:
        self._retryable = False
        token = context.enter(spec, self.gpu_ids)
        self.running = spec
        try:
            if spec.task_id in self.cancelled:
                raise TaskCancelledError(f"task {spec.name} cancelled")
            args, kwargs = self.resolve_args(spec)
            result = fn(*args, **kwargs)
            return self.pack(spec, result)
        except KeyboardInterrupt:
            return self.pack_error(spec, TaskCancelledError(f"task {spec.name} cancelled"))
        except BaseException as exc:  # the user's code raised: ship it to the owner
            return self.pack_error(spec, exc)
        finally:
            self.running = None
            context.leave(token)

    def pack(self, spec: TaskSpec, result) -> list:
        n = len(spec.return_ids)
        if n == 1:
            results = [result]
        else:
            results = list(result)
            if len(results) != n:
                raise ValueError(f"{spec.name} declared num_returns={n} but returned "
                                 f"{len(results)} values")
        out = []
        core = self.core
        for oid, value in zip(spec.return_ids, results):
            sv = serialize(value)
            contained = None
            if sv.contained_refs:
                # the result keeps these alive: said now, before this process can drop
                # its own refs to them (the agent registers it with their owners)
                core.mark_escaped(sv.contained_refs)
                contained = ref_pairs(sv.contained_refs)
                core.add_op((m.REF_CONTAINS, oid, spec.owner_node, contained))
            if sv.total_size <= INLINE_MAX:
                data = sv.to_bytes()
                out.append(ReturnValue(oid, data, None, len(data), False, contained))
            else:
                size = write_object(core.store_paths[0], oid, sv)
                out.append(ReturnValue(oid, None, core.node_id, size, False, contained))
        return out

    def pack_error(self, spec: TaskSpec, exc: BaseException) -> list:
        if isinstance(exc, TaskCancelledError):
            err = exc
        else:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            cause = exc if picklable(exc) else None
            err = TaskError(spec.name, tb, cause)
            retry = spec.retry_exceptions
            if retry is True or (isinstance(retry, (list, tuple)) and isinstance(exc, tuple(retry))):
                self._retryable = True
        sv = serialize(err)
        data = sv.to_bytes()
        contained = None
        if sv.contained_refs:   # an exception that holds refs keeps them, like a value
            core = self.core
            core.mark_escaped(sv.contained_refs)
            contained = ref_pairs(sv.contained_refs)
            for oid in spec.return_ids:
                core.add_op((m.REF_CONTAINS, oid, spec.owner_node, contained))
        return [ReturnValue(oid, data, None, len(data), True, contained)
                for oid in spec.return_ids]

    # ------------------------------------------------------------------ actors
    def init_actor(self, spec: TaskSpec) -> None:
        cls = self.load(spec)
        self.actor_spec = spec
        opts = spec.actor_options or {}
        context.set_actor(spec.actor_id)
        self._retryable = False
        token = context.enter(spec, self.gpu_ids)
        args = kwargs = None
        try:
            args, kwargs = self.resolve_args(spec)
            self.actor = cls(*args, **kwargs)
        except BaseException as exc:
            # like Ray's RayActorError: every call to this actor raises ActorDiedError,
            # which carries the constructor's exception and traceback
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            err = ActorDiedError(f"actor {spec.name} died: its constructor raised "
                                 f"{type(exc).__name__}: {exc}\n{tb}")
            err.cause = exc if _picklable(exc) else None
            err.traceback_str = tb
            args = kwargs = None
            self.core.uncover(_cover_key(spec))
            self.core.send((m.ACTOR_READY, spec.actor_id, serialize(err).to_bytes()))
            return
        finally:
            context.leave(token)
        args = kwargs = None
        self.core.uncover(_cover_key(spec))   # what __init__ kept becomes borrows
        if opts.get("is_async"):
            self.async_loop = asyncio.new_event_loop()
            limit = opts.get("max_concurrency") or 1000
            threading.Thread(target=self._run_async_loop, args=(limit,), daemon=True).start()
        elif (opts.get("max_concurrency") or 1) > 1:
            self.pool = ThreadPoolExecutor(max_workers=opts["max_concurrency"])
        self.core.send((m.ACTOR_READY, spec.actor_id, None))

    def _run_async_loop(self, limit: int) -> None:
        asyncio.set_event_loop(self.async_loop)
        self.async_sem = asyncio.Semaphore(limit)
        self.async_loop.run_forever()

    def run_actor_call(self, spec: TaskSpec) -> None:
        if self.async_loop is not None:
            while self.async_sem is None:
                threading.Event().wait(0.001)
            asyncio.run_coroutine_threadsafe(self._async_call(spec), self.async_loop)
        elif self.pool is not None:
            self.pool.submit(self._sync_call, spec)
        else:
            self._sync_call(spec)

    def _sync_call(self, spec: TaskSpec) -> None:
        method = getattr(self.actor, spec.method)
        returns = self.execute(spec, method)
        del method
        self.done(spec, returns, self._retryable)

    async def _async_call(self, spec: TaskSpec) -> None:
        async with self.async_sem:
            token = context.enter(spec, self.gpu_ids)
            try:
                args, kwargs = await asyncio.get_running_loop().run_in_executor(
                    None, self.resolve_args, spec) if spec.deps else self.resolve_args(spec)
                method = getattr(self.actor, spec.method)
                result = method(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    result = await result
                returns = self.pack(spec, result)
            except BaseException as exc:
                returns = self.pack_error(spec, exc)
            finally:
                context.leave(token)
                # what the call kept of its arguments is what still holds them now
                args = kwargs = method = result = None
        self.done(spec, returns, False)


def _cover_key(spec: TaskSpec) -> tuple:
    """What covers the refs in a task's arguments (a tuple: never an object id)."""
    return ("task", spec.task_id)


def _picklable(exc) -> bool:
    return picklable(exc)


def _safe_call(fn) -> None:
    try:
        fn()
    except Exception:
        traceback.print_exc()


def main() -> None:
    socket_path = os.environ["STRATO_AGENT_SOCKET"]
    worker_id = bytes.fromhex(os.environ["STRATO_WORKER_ID"])
    # direct calls and leased tasks come to this socket (told to the agent in HELLO)
    host = DirectHost(os.path.dirname(socket_path))
    core = CoreWorker(socket_path, "worker", worker_id, direct_path=host.path)
    set_current(core)
    context.set_worker(core)
    executor = Executor(core, host if host.path is not None else None)
    try:
        executor.run_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
