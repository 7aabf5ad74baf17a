"""Ray Core's public API on strato's runtime: init, remote, get, put, wait, actors."""

from __future__ import annotations

import atexit
import difflib
import hashlib
import inspect
import json
import operator
import os
import subprocess
import sys
from typing import Any

import cloudpickle

from strato.exceptions import RuntimeNotInitializedError
from strato.runtime import calls, context, placement, scheduler
from strato.runtime import messages as m
from strato.runtime.control import start_node
from strato.runtime.core import CoreWorker, ObjectRef, current, set_current
from strato.runtime.serialization import serialize
from strato.runtime.session import DEFAULT_TEMP_DIR, node_files
from strato.runtime.spec import ACTOR_CALL, ACTOR_CREATE, INLINE_MAX, TASK, ArgRef, TaskSpec

_state: dict[str, Any] = {"node_proc": None, "namespace": "", "temp_dir": None}

TASK_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "max_retries",
                "retry_exceptions", "num_returns", "name", "runtime_env", "scheduling_strategy",
                "retention_s"}
ACTOR_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type",
                 "max_restarts", "max_task_retries", "name", "namespace", "lifetime",
                 "max_concurrency", "runtime_env", "scheduling_strategy", "get_if_exists"}


# ---------------------------------------------------------------------- init
#: ``ray.init`` keywords that strato accepts so Ray code runs unchanged, and ignores
#: (what they configure has no counterpart here: dashboard, logging setup, Ray internals)
RAY_ONLY_INIT_KWARGS = frozenset({
    "local_mode", "include_dashboard", "dashboard_host", "dashboard_port", "job_config",
    "configure_logging", "logging_level", "logging_format", "logging_config",
    "runtime_env", "storage", "labels", "enable_resource_isolation",
    "system_reserved_cpu", "system_reserved_memory", "_system_config", "_node_ip_address",
    "_node_name", "_plasma_directory", "_redis_password", "_metrics_export_port",
    "_enable_object_reconstruction", "_memory", "_tracing_startup_hook",
    "_skip_env_hook"})
_INIT_PARAMS = ("address", "num_cpus", "num_gpus", "resources", "namespace",
                "ignore_reinit_error", "token", "object_store_memory", "temp_dir",
                "log_to_driver", "cluster", "working_dir")
_noted_ray_only: set[str] = set()


def _check_init_kwargs(extra: dict[str, Any], temp_dir: str | None) -> str | None:
    """Refuse unknown ``init`` keywords (with a suggestion), note Ray-only ones once;
    returns ``temp_dir`` (Ray spells it ``_temp_dir``)."""
    if "_temp_dir" in extra:
        temp_dir = temp_dir or extra.pop("_temp_dir")
    unknown = sorted(k for k in extra if k not in RAY_ONLY_INIT_KWARGS)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, _INIT_PARAMS + tuple(RAY_ONLY_INIT_KWARGS),
                                          n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"strato.init() got an unexpected keyword argument {name!r}{hint}")
    new = sorted(set(extra) - _noted_ray_only)
    if new:
        _noted_ray_only.update(new)
        _warn(f"init(): ignoring Ray-only argument(s) {', '.join(new)} (no effect in strato)")
    return temp_dir


def _log_line(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=False)
    sys.stdout.flush()


def _warn(text: str) -> None:
    print(f"strato warning: {text}", file=sys.stderr, flush=True)


def init(address: str | None = None, *, num_cpus: float | None = None,
         num_gpus: float | None = None, resources: dict | None = None,
         namespace: str | None = None, ignore_reinit_error: bool = False,
         token: str | None = None, object_store_memory: int | None = None,
         temp_dir: str | None = None, log_to_driver: bool = True, **ray_only: Any) -> dict:
    """Connect this process to a cluster, starting a local one when no address is given.

    ``address``: None (start a local head+node), "auto" (the node running on this
    machine), "host:port" (a head; a zero-resource local node joins it for this driver).
    Keywords only Ray has (``RAY_ONLY_INIT_KWARGS``) are accepted and ignored, with one
    note; any other unknown keyword is a ``TypeError``.
    """
    temp_dir = _check_init_kwargs(ray_only, temp_dir)
    if current() is not None:
        if ignore_reinit_error:
            return _info()
        raise RuntimeError("strato.init() was already called; pass ignore_reinit_error=True "
                           "or call strato.shutdown() first")
    for name, value in (resources or {}).items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"init(resources={{{name!r}: {value!r}}}): amounts must be >= 0")
    if num_cpus is not None and num_cpus < 0:
        raise ValueError(f"init(num_cpus={num_cpus}): must be >= 0")
    temp_dir = os.path.abspath(temp_dir or os.environ.get("STRATO_TEMP_DIR", DEFAULT_TEMP_DIR))
    _state["temp_dir"] = temp_dir
    token = token or os.environ.get("STRATO_TOKEN")
    if address is None:
        address = os.environ.get("STRATO_ADDRESS")
    if address in (None, "local"):
        info = _start_node(temp_dir, head=True, num_cpus=num_cpus, num_gpus=num_gpus,
                           resources=resources, object_store_memory=object_store_memory)
    elif address == "auto":
        nodes = node_files(temp_dir)
        if not nodes:
            raise ConnectionError(f"address='auto': no strato node runs on this machine (looked "
                                  f"in {temp_dir}); start one with `strato start --head`")
        info = nodes[0]
    else:
        info = next((n for n in node_files(temp_dir) if n["head_address"] == address
                     or (n.get("head") and n["agent_address"] == address)), None)
        if info is None:
            if not token:
                raise ConnectionError(f"joining {address} needs the cluster token: pass "
                                      "init(token=...) or set STRATO_TOKEN")
            info = _start_node(temp_dir, head=False, address=address, token=token, num_cpus=0,
                               num_gpus=0, resources=resources,
                               object_store_memory=object_store_memory)
    attach(CoreWorker(info["socket"], "driver"), info["head_address"], namespace=namespace,
           log_to_driver=log_to_driver)
    return _info()


def attach(core: CoreWorker, address: str, *, namespace: str | None = None,
           log_to_driver: bool = True) -> None:
    """Make ``core`` this process's connection (``init``, and the serverless client's
    remote driver)."""
    if log_to_driver:
        core.log_handler = _log_line
    core.warn_handler = _warn
    set_current(core)
    context.set_worker(core)
    _state["namespace"] = namespace or ""
    _state["head_address"] = address
    atexit.register(shutdown)


def _info() -> dict:
    core = current()
    return {"address": _state.get("head_address"), "node_id": core.node_id.hex(),
            "namespace": _state["namespace"]}


def _start_node(temp_dir: str, *, head: bool, address: str | None = None,
                token: str | None = None, num_cpus=None, num_gpus=None, resources=None,
                object_store_memory=None) -> dict:
    """Start a runtime node process tied to this driver (it exits when we do); returns
    its node file. Raises ``StartError`` (a ``ConnectionError``) if it cannot start."""
    node = start_node(head=head, temp_dir=temp_dir, address=address,
                      port=0 if head else None, node_ip="127.0.0.1" if head else None,
                      token=token, num_cpus=num_cpus, num_gpus=num_gpus,
                      resources=json.dumps(resources) if resources else None,
                      object_store_memory=int(object_store_memory) if object_store_memory
                      else None, parent_pid=os.getpid())
    _state["node_proc"] = node.proc
    return node.info


#: called by ``shutdown`` after the connection closed (the serverless client's tunnel)
shutdown_hooks: list = []
#: called with the remote function or class before it is pickled the first time (the
#: serverless client registers local modules to travel by value)
export_hooks: list = []


def shutdown() -> None:
    """Disconnect; stop the local cluster this driver started."""
    core = current()
    if core is not None:
        try:
            core.close()
        except Exception:
            pass
        set_current(None)
    while shutdown_hooks:
        try:
            shutdown_hooks.pop()()
        except Exception:
            pass
    proc = _state.get("node_proc")
    if proc is not None:
        _state["node_proc"] = None
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def is_initialized() -> bool:
    return current() is not None


def _core() -> CoreWorker:
    core = current()
    if core is None:
        raise RuntimeNotInitializedError("strato is not initialized: call strato.init() first")
    return core


# ---------------------------------------------------------------------- options
def _check_options(options: dict, allowed: set, where: str) -> None:
    for key, value in options.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown option {key!r}{hint}")
        if key in ("num_cpus", "num_gpus", "memory") and value is not None:
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}: option {key}={value!r} must be a number >= 0")
        if key == "resources" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: option resources must be a dict, got {type(value).__name__}")
            for name, amount in value.items():
                if name in ("CPU", "GPU"):
                    raise ValueError(f"{where}: use num_cpus/num_gpus instead of resources[{name!r}]")
                if not isinstance(amount, (int, float)) or amount < 0:
                    raise ValueError(f"{where}: resources[{name!r}]={amount!r} must be a number >= 0")
        if key == "num_returns" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: num_returns must be an int >= 1, got {value!r}")
        if key in ("max_retries", "max_restarts", "max_task_retries") and \
                (not isinstance(value, int) or value < -1):
            raise ValueError(f"{where}: {key} must be an int >= -1, got {value!r}")
        if key == "retention_s" and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}: retention_s must be a number of seconds > 0, got "
                             f"{value!r}")
        if key == "max_concurrency" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: max_concurrency must be an int >= 1, got {value!r}")
        if key == "lifetime" and value not in (None, "detached", "non_detached"):
            raise ValueError(f"{where}: lifetime must be 'detached' or None, got {value!r}")


def _resources(options: dict, default_cpu: float) -> dict:
    res = {}
    cpu = options.get("num_cpus")
    cpu = default_cpu if cpu is None else cpu
    if cpu:
        res["CPU"] = float(cpu)
    if options.get("num_gpus"):
        res["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        res["memory"] = float(options["memory"])
    for k, v in (options.get("resources") or {}).items():
        if v:
            res[k] = float(v)
    if options.get("accelerator_type"):
        res[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return res


def _placed(resources: dict, options: dict, where: str) -> dict:
    """The shape to ask for under ``scheduling_strategy``: inside a placement group's
    bundle (``PlacementGroupSchedulingStrategy``) it is renamed to that bundle's
    resources (``placement.group_shape``); other strategies change nothing."""
    strategy = options.get("scheduling_strategy")
    pg = getattr(strategy, "placement_group", None)
    if pg is None:
        return resources
    index = strategy.placement_group_bundle_index
    bundles = pg.bundle_specs
    if not isinstance(index, int) or not -1 <= index < len(bundles):
        raise ValueError(f"{where}: placement_group_bundle_index={index!r} is out of range "
                         f"for a group of {len(bundles)} bundle(s)")
    candidates = bundles if index == -1 else [bundles[index]]
    if not any(scheduler.fits(resources, b) for b in candidates):
        which = "any bundle" if index == -1 else f"bundle {index} ({bundles[index]})"
        raise ValueError(f"{where}: needs {resources}, more than {which} of placement "
                         f"group {pg.id.hex()[:8]} reserves")
    return placement.group_shape(resources, pg.id.hex(), index)


def _export(holder, target) -> bytes:
    """Pickle ``target`` once per remote function/class (cached on ``holder``, never by
    id(), which Python reuses), and send it to this driver's agent once per connection."""
    cached = holder.__dict__.get("_exported")
    if cached is None:
        for hook in export_hooks:
            hook(target)
        blob = cloudpickle.dumps(target, protocol=5)
        cached = (hashlib.sha1(blob).digest(), blob)
        holder._exported = cached
    _core().export_function(cached[0], cached[1])
    return cached[0]


def _prepare_args(core: CoreWorker, args: tuple, kwargs: dict):
    """Top-level refs become dependencies; large values are put in the store first."""
    deps = []
    keep = []
    if args or kwargs:
        recyclable = core.recyclable
        new_args = []
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
        core.mark_escaped(sv.contained_refs)
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
        _check_options(options, TASK_OPTIONS, f"@remote on {fn.__qualname__}")
        self._fn = fn
        self._options = options
        self._name = fn.__qualname__
        self._resources = _placed(_resources(options, default_cpu=1.0), options,
                                  f"@remote on {fn.__qualname__}")
        self._num_returns = options.get("num_returns", 1)
        self._max_retries = options.get("max_retries", 3)
        self._retry_exceptions = options.get("retry_exceptions", False)
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
        core = _core()
        origin = getattr(self, "_export_key", self)
        fid = _export(origin, origin._fn)
        blob, deps, keep = _prepare_args(core, args, kwargs)
        task_id = core.ids.next()
        return_ids = core.new_return_ids(self._num_returns, task_id)
        spec = TaskSpec(task_id, TASK, core.job_id, core.node_id, core.client_id, fid,
                        self._name, blob, deps, return_ids, self._resources, self._max_retries,
                        self._retry_exceptions)
        if core.runtime_env is not None:
            spec.runtime_env = core.runtime_env
        if keep:
            core.pinned[task_id] = keep
            for oid in return_ids:
                core.task_of[oid] = task_id
        core.send((m.SUBMIT, [spec]))
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
        core = _core()
        origin = getattr(self, "_export_key", self)
        fid = _export(origin, origin._fn)
        blob, deps, keep = _prepare_args(core, args, kwargs)
        core.mark_escaped(keep)   # the head takes its arguments over; never freed from here
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
        _check_options(options, ACTOR_OPTIONS, f"@remote on class {cls.__qualname__}")
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
        core = _core()
        opts = self._options
        name = opts.get("name")
        namespace = opts.get("namespace", _state["namespace"])
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
        fid = _export(origin, origin._cls)
        meta = self._meta()
        blob, deps, keep = _prepare_args(core, args, kwargs)
        actor_id = core.ids.next()
        actor_options = {
            "max_restarts": opts.get("max_restarts", 0),
            "max_task_retries": opts.get("max_task_retries", 0),
            "max_concurrency": opts.get("max_concurrency"),
            "is_async": meta["is_async"], "name": name, "namespace": namespace,
            "lifetime": opts.get("lifetime"),
        }
        resources = _placed(_resources(opts, default_cpu=0.0), opts,
                            f"actor class {self._name}")
        spec = TaskSpec(actor_id, ACTOR_CREATE, core.job_id, core.node_id, core.client_id, fid,
                        self._name, blob, deps, [], resources, 0, False, actor_id=actor_id,
                        actor_options=actor_options, runtime_env=core.runtime_env)
        if keep:
            core.pinned[actor_id] = keep
        # the head keeps the creation spec to restart the actor; its args must be inline
        if deps:
            spec.dep_values = None
        core.send((m.ACTOR_CREATE, spec, meta))
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
        core = _core()
        blob, deps, keep = _prepare_args(core, args, kwargs)
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
        core.send((m.ACTOR_CALLS, [spec]))
        node = core.node_id
        if num_returns == 1:
            return ObjectRef(return_ids[0], node)
        return [ObjectRef(oid, node) for oid in return_ids]


def remote(*args, **options):
    """``@remote`` / ``@remote(num_cpus=1, ...)`` on a function or class."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@remote takes keyword options only, e.g. @remote(num_cpus=1)")

    def deco(target):
        return _make_remote(target, options)
    return deco


def _make_remote(target, options: dict):
    if inspect.isclass(target):
        return ActorClass(target, options)
    if callable(target):
        return RemoteFunction(target, options)
    raise TypeError(f"@remote applies to functions and classes, not {type(target).__name__}")


# ---------------------------------------------------------------------- objects
def get(refs, *, timeout: float | None = None):
    core = _core()
    try:
        if isinstance(refs, ObjectRef):
            return core.get([refs], timeout)[0]
        if isinstance(refs, (list, tuple)):
            for r in refs:
                if not isinstance(r, ObjectRef):
                    raise TypeError(f"get() takes ObjectRefs, got {type(r).__name__} in the list")
            return core.get(list(refs), timeout)
    except KeyboardInterrupt:
        _interrupted(core)
        raise
    raise TypeError(f"get() takes an ObjectRef or a list of them, got {type(refs).__name__}")


def _interrupted(core: CoreWorker) -> None:
    """Ctrl-C in a remote driver's wait cancels its calls in flight (not durable ones)."""
    if core.remote:
        core.cancel_inflight()


def put(value) -> ObjectRef:
    return _core().put(value)


def wait(refs: list, *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True):
    if isinstance(refs, ObjectRef) or not isinstance(refs, (list, tuple)):
        raise TypeError("wait() takes a list of ObjectRefs")
    try:
        ids = list(map(_ref_id, refs))
    except AttributeError:
        raise TypeError("wait() takes a list of ObjectRefs") from None
    if len(set(ids)) != len(ids):
        raise ValueError("wait() got duplicate ObjectRefs")
    if num_returns < 1 or num_returns > len(refs):
        raise ValueError(f"wait(num_returns={num_returns}) must be between 1 and len(refs)="
                         f"{len(refs)}")
    core = _core()
    try:
        return core.wait(refs if type(refs) is list else list(refs), num_returns, timeout,
                         fetch_local, ids)
    except KeyboardInterrupt:
        _interrupted(core)
        raise


_ref_id = operator.attrgetter("id")


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    core = _core()
    # a task's first return id is its task id
    core.send((m.CANCEL, ref.id, force))


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an actor handle, got {type(actor).__name__}")
    _core().send((m.KILL_ACTOR, actor._actor_id, no_restart))


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    core = _core()
    ns = _state["namespace"] if namespace is None else namespace
    actor_id, meta, owner = core.rpc("get_actor", name, ns)
    opts = {"name": name, "namespace": ns}
    return ActorHandle(actor_id, meta, opts, owner)


#: Ray's ``ray.nodes()`` keys for the head's node schema (``HeadClient.nodes()``)
RAY_NODE_KEYS = {
    "node_id": "NodeID", "alive": "Alive", "node_ip": "NodeManagerAddress",
    "address": "Address", "resources": "Resources", "available": "Available",
    "labels": "Labels", "draining": "Draining", "drain_reason": "DrainReason",
    "idle_seconds": "IdleSeconds", "object_store_used": "ObjectStoreUsed",
    "num_actors": "NumActors",
}


def nodes() -> list[dict]:
    """Every node of the cluster, in Ray's format (``NodeID``, ``Alive``, ``Resources``...)."""
    return [{RAY_NODE_KEYS.get(k, k): v for k, v in node.items()}
            for node in _core().rpc("nodes")]


def cluster_resources() -> dict:
    return _core().rpc("cluster_resources")


def available_resources() -> dict:
    return _core().rpc("available_resources")


def get_runtime_context():
    return context.runtime_context(_core(), _state["namespace"])


def get_gpu_ids() -> list:
    return context.current_gpu_ids()
