"""What ``@strato.remote`` makes: remote functions, actor classes and handles, and the
path from ``.remote(...)`` to a submitted ``TaskSpec`` (arguments packed once, big ones
put in the store, the function pickled and exported once per connection)."""

from __future__ import annotations

import hashlib
import inspect

import cloudpickle

from strato.runtime import calls, context, placement
from strato.runtime import messages as m
from strato.runtime import options as opts_check
from strato.runtime.core import CoreWorker, ObjectRef, ref_pairs, require_current
from strato.runtime.serialization import serialize
from strato.runtime.spec import ACTOR_CALL, ACTOR_CREATE, INLINE_MAX, TASK, ArgRef, TaskSpec

#: called with the remote function or class before it is pickled the first time (the
#: serverless client registers local modules to travel by value)
export_hooks: list = []


def export(holder, target) -> bytes:
    """Pickle ``target`` once per remote function/class (cached on ``holder``, never by
    id(), which Python reuses), and send it to this driver's agent once per connection."""
    cached = holder.__dict__.get("_exported")
    if cached is None:
        for hook in export_hooks:
            hook(target)
        blob = cloudpickle.dumps(target, protocol=5)
        cached = (hashlib.sha1(blob).digest(), blob)
        holder._exported = cached
    require_current().export_function(cached[0], cached[1])
    return cached[0]


def prepare_args(core: CoreWorker, args: tuple, kwargs: dict):
    """Top-level refs become dependencies; large values are put in the store first.

    ``keep``: the refs the caller pins until the task is done: top-level ones and those
    nested in the arguments (the worker registers those it keeps past the task)."""
    deps = []
    keep = []
    if args or kwargs:
        recyclable = core.recyclable
        new_args = []
        if core.direct_pending or core.direct_unknown:
            # a direct actor call's result passed on: its agent must know it first
            for a in (*args, *kwargs.values()):
                if type(a) is ObjectRef:
                    core.adopt(a.id)
        for a in args:
            if type(a) is ObjectRef:
                recyclable.pop(a.id, None)
                new_args.append(ArgRef(len(deps)))
                deps.append((a.id, a.owner_node))
                keep.append(a)
            else:
                new_args.append(a)
        new_kwargs = {}
        for k, v in kwargs.items():
            if type(v) is ObjectRef:
                recyclable.pop(v.id, None)
                new_kwargs[k] = ArgRef(len(deps))
                deps.append((v.id, v.owner_node))
                keep.append(v)
            else:
                new_kwargs[k] = v
        try:
            sv = serialize((new_args, new_kwargs))
        except Exception as exc:
            raise TypeError(f"could not serialize the arguments: {exc}") from exc
        if sv.total_size > INLINE_MAX:
            # put big arguments in the store, pass refs instead
            big_args = []
            for a in new_args:
                if not isinstance(a, ArgRef) and _size_guess(a) > INLINE_MAX // 4:
                    ref = core.put(a)
                    recyclable.pop(ref.id, None)
                    big_args.append(ArgRef(len(deps)))
                    deps.append((ref.id, ref.owner_node))
                    keep.append(ref)
                else:
                    big_args.append(a)
            for k, v in list(new_kwargs.items()):
                if not isinstance(v, ArgRef) and _size_guess(v) > INLINE_MAX // 4:
                    ref = core.put(v)
                    recyclable.pop(ref.id, None)
                    new_kwargs[k] = ArgRef(len(deps))
                    deps.append((ref.id, ref.owner_node))
                    keep.append(ref)
            sv = serialize((big_args, new_kwargs))
        if sv.contained_refs:
            core.mark_escaped(sv.contained_refs)
            keep.extend(sv.contained_refs)
        return sv.to_bytes(), deps, keep
    return _EMPTY_ARGS, deps, keep


_EMPTY_ARGS = serialize(((), {})).to_bytes()


def _size_guess(value) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    try:
        return serialize(value).total_size
    except Exception:
        return 0


# ---------------------------------------------------------------------- functions
class RemoteFunction:
    """What ``@strato.remote`` makes of a function: call it with ``.remote()``."""

    def __init__(self, fn, options: dict):
        where = f"@remote on {fn.__qualname__}"
        opts_check.check_options(options, opts_check.TASK_OPTIONS, where)
        self._fn = fn
        self._options = options
        self._name = fn.__qualname__
        self._resources = opts_check.placed(
            opts_check.resources_of(options, default_cpu=1.0), options, where)
        self._num_returns = options.get("num_returns", 1)
        self._max_retries = options.get("max_retries", 3)
        self._retry_exceptions = options.get("retry_exceptions", False)
        # the shape a leased worker runs (None: never leased: placement groups, and GPUs,
        # which a lease would hold from an actor the head places here meanwhile)
        self._lease_key = None if placement.is_group_shape(self._resources) \
            or self._resources.get("GPU") else tuple(sorted(self._resources.items()))
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", self._name)

    def __call__(self, *args, **kwargs):
        raise TypeError(f"remote function {self._name} cannot be called directly; "
                        f"use {self.__name__}.remote(...)")

    def options(self, **options) -> RemoteFunction:
        merged = dict(self._options)
        merged.update(options)
        clone = RemoteFunction(self._fn, merged)
        clone._export_key = self
        return clone

    def remote(self, *args, **kwargs):
        core = require_current()
        origin = getattr(self, "_export_key", self)
        fid = export(origin, origin._fn)
        blob, deps, keep = prepare_args(core, args, kwargs)
        task_id = core.ids.next()
        return_ids = core.new_return_ids(self._num_returns, task_id)
        spec = TaskSpec(task_id, TASK, core.job_id, core.node_id, core.client_id, fid,
                        self._name, blob, deps, return_ids, self._resources, self._max_retries,
                        self._retry_exceptions)
        if core.runtime_env is not None:
            spec.runtime_env = core.runtime_env
        if keep:
            if len(keep) > len(deps):   # (keep: the top-level refs, then the nested ones)
                spec.nested = [(r.id, r.owner_node) for r in keep[len(deps):]]
            core.pinned[task_id] = keep
            for oid in return_ids:
                core.task_of[oid] = task_id
        # no ref arguments, no retry on exceptions: it may go to a leased worker
        core.submit_task(spec, None if keep or self._retry_exceptions else self._lease_key)
        node = core.node_id
        if self._num_returns == 1:
            return ObjectRef(return_ids[0], node)
        return [ObjectRef(oid, node) for oid in return_ids]

    def map(self, *iterables, order_outputs: bool = True, return_exceptions: bool = False,
            max_in_flight: int | None = None, progress: bool | None = None):
        """One call per item (several iterables: zipped, like ``map``), at most
        ``max_in_flight`` at once; yields the results as they are ready, in input order
        unless ``order_outputs=False``; a progress bar when stdout is a terminal."""
        return calls.map_method(self.remote, self._name, iterables, order_outputs=order_outputs,
                                return_exceptions=return_exceptions,
                                max_in_flight=max_in_flight, progress=progress)

    def starmap(self, iterable, **options):
        """``.map`` where each item is a tuple of arguments."""
        return calls.starmap_method(self.remote, self._name, iterable, **options)

    def spawn(self, *args, **kwargs) -> calls.FunctionCall:
        """A durable call: runs and keeps its result on the head (24 h, or the option
        ``retention_s``) even if this process disconnects or exits."""
        if self._num_returns != 1:
            raise ValueError(f"{self._name}.spawn(): durable calls return one value "
                             f"(num_returns={self._num_returns})")
        core = require_current()
        origin = getattr(self, "_export_key", self)
        fid = export(origin, origin._fn)
        blob, deps, keep = prepare_args(core, args, kwargs)
        # the head takes its arguments over (they outlive this session): never freed
        # from here, nested refs included
        core.keep_forever(keep)
        task_id = core.ids.next()
        spec = TaskSpec(task_id, TASK, core.job_id, core.node_id, core.client_id, fid,
                        self._name, blob, deps, [task_id], self._resources, self._max_retries,
                        self._retry_exceptions, runtime_env=core.runtime_env)
        core.send((m.SPAWN, spec, self._options.get("retention_s")))
        # the head has it once it answers for it (same stream): exiting now loses nothing
        core.rpc("durable_call", task_id)
        return calls.FunctionCall(task_id, core.node_id, self._name)


# ---------------------------------------------------------------------- actors
def method(*, num_returns: int = 1, concurrency_group: str | None = None):
    """Decorate an actor method with options (like ``ray.method``)."""
    def deco(fn):
        fn.__strato_num_returns__ = num_returns
        return fn
    return deco


class ActorClass:
    """What ``@strato.remote`` makes of a class: create actors with ``.remote()``."""

    def __init__(self, cls, options: dict):
        opts_check.check_options(options, opts_check.ACTOR_OPTIONS,
                                 f"@remote on class {cls.__qualname__}")
        self._cls = cls
        self._options = options
        self._name = cls.__qualname__
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor class {self._name} cannot be instantiated directly; "
                        f"use {self.__name__}.remote(...)")

    def options(self, **options) -> ActorClass:
        merged = dict(self._options)
        merged.update(options)
        clone = ActorClass(self._cls, merged)
        clone._export_key = self
        return clone

    def _meta(self) -> dict:
        methods = {}
        is_async = False
        for name, member in inspect.getmembers(self._cls, callable):
            if name.startswith("__") and name != "__call__":
                continue
            methods[name] = getattr(member, "__strato_num_returns__", 1)
            if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
                is_async = True
        return {"methods": methods, "is_async": is_async, "class_name": self._name}

    def remote(self, *args, **kwargs) -> ActorHandle:
        core = require_current()
        opts = self._options
        name = opts.get("name")
        namespace = opts.get("namespace", context.namespace())
        if name and opts.get("get_if_exists"):
            try:
                return get_actor(name, namespace)
            except ValueError:
                pass
        if name:
            try:
                get_actor(name, namespace)
            except ValueError:
                pass
            else:
                raise ValueError(f"an actor named {name!r} already exists in namespace "
                                 f"{namespace!r}")
        origin = getattr(self, "_export_key", self)
        fid = export(origin, origin._cls)
        meta = self._meta()
        blob, deps, keep = prepare_args(core, args, kwargs)
        actor_id = core.ids.next()
        actor_options = {
            "max_restarts": opts.get("max_restarts", 0),
            "max_task_retries": opts.get("max_task_retries", 0),
            "max_concurrency": opts.get("max_concurrency"),
            "is_async": meta["is_async"], "name": name, "namespace": namespace,
            "lifetime": opts.get("lifetime"),
        }
        resources = opts_check.placed(opts_check.resources_of(opts, default_cpu=0.0), opts,
                                      f"actor class {self._name}")
        spec = TaskSpec(actor_id, ACTOR_CREATE, core.job_id, core.node_id, core.client_id, fid,
                        self._name, blob, deps, [], resources, 0, False, actor_id=actor_id,
                        actor_options=actor_options, runtime_env=core.runtime_env)
        # the head keeps the creation spec to restart the actor; its args must be inline
        if deps:
            spec.dep_values = None
        # the agent keeps the argument refs alive until the actor is dead for good
        # (restarts read them again); this process may drop its own refs once sent,
        # but must not unlink their files then
        core.mark_escaped(keep)
        core.send((m.ACTOR_CREATE, spec, meta, ref_pairs(keep) if keep else None))
        return ActorHandle(actor_id, meta, actor_options, core.node_id)


class ActorMethod:
    __slots__ = ("_handle", "_name", "_num_returns")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name} cannot be called directly; "
                        f"use .{self._name}.remote(...)")

    def options(self, num_returns: int | None = None, **_):
        return ActorMethod(self._handle, self._name, num_returns or self._num_returns)

    def remote(self, *args, **kwargs):
        return self._handle._call(self._name, args, kwargs, self._num_returns)

    def map(self, *iterables, **options):
        """``RemoteFunction.map`` for this method (calls keep the caller's order)."""
        return calls.map_method(self.remote, self._name, iterables, **options)

    def starmap(self, iterable, **options):
        return calls.starmap_method(self.remote, self._name, iterable, **options)


class ActorHandle:
    """A reference to an actor; pass it to tasks, call its methods with ``.remote()``."""

    def __init__(self, actor_id: bytes, meta: dict, options: dict, owner_node: bytes):
        self._actor_id = actor_id
        self._meta = meta
        self._options = options
        self._owner_node = owner_node
        self._seq = 0

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        methods = self._meta["methods"]
        if name not in methods:
            raise AttributeError(f"actor {self._meta['class_name']} has no method {name!r}")
        return ActorMethod(self, name, methods[name])

    def __reduce__(self):
        return (ActorHandle, (self._actor_id, self._meta, self._options, self._owner_node))

    def __repr__(self) -> str:
        return f"Actor({self._meta['class_name']}, {self._actor_id.hex()})"

    def _call(self, method_name: str, args, kwargs, num_returns: int):
        core = require_current()
        blob, deps, keep = prepare_args(core, args, kwargs)
        task_id = core.ids.next()
        return_ids = core.new_return_ids(num_returns, task_id)
        self._seq += 1
        spec = TaskSpec(task_id, ACTOR_CALL, core.job_id, core.node_id, core.client_id, b"",
                        f"{self._meta['class_name']}.{method_name}", blob, deps, return_ids, {},
                        0, False, actor_id=self._actor_id, method=method_name,
                        actor_options=self._options, seq=self._seq)
        if keep:
            core.pinned[task_id] = keep
            for oid in return_ids:
                core.task_of[oid] = task_id
        # no ref arguments: it may go straight to the actor's worker (runtime.direct)
        core.submit_actor_call(spec, direct_ok=not keep)
        node = core.node_id
        if num_returns == 1:
            return ObjectRef(return_ids[0], node)
        return [ObjectRef(oid, node) for oid in return_ids]


def remote(*args, **options):
    """``@remote`` / ``@remote(num_cpus=1, ...)`` on a function or class."""
    if len(args) == 1 and not options and callable(args[0]):
        return make_remote(args[0], {})
    if args:
        raise TypeError("@remote takes keyword options only, e.g. @remote(num_cpus=1)")

    def deco(target):
        return make_remote(target, options)
    return deco


def make_remote(target, options: dict):
    if inspect.isclass(target):
        return ActorClass(target, options)
    if callable(target):
        return RemoteFunction(target, options)
    raise TypeError(f"@remote applies to functions and classes, not {type(target).__name__}")


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    core = require_current()
    ns = context.namespace() if namespace is None else namespace
    actor_id, meta, owner = core.rpc("get_actor", name, ns)
    opts = {"name": name, "namespace": ns}
    return ActorHandle(actor_id, meta, opts, owner)
