"""Ray Core's public API on strato's runtime: init, remote, get, put, wait, actors."""

from __future__ import annotations

import atexit
import difflib
import json
import operator
import os
import subprocess
import sys
from typing import Any

from strato.runtime import context
from strato.runtime import messages as m
from strato.runtime.control import start_node
from strato.runtime.core import CoreWorker, ObjectRef, current, require_current, set_current
from strato.runtime.handles import (  # noqa: F401  (the public API, re-exported)
    ActorClass,
    ActorHandle,
    ActorMethod,
    RemoteFunction,
    export_hooks,
    get_actor,
    method,
    remote,
)
from strato.runtime.session import DEFAULT_TEMP_DIR, node_files

_state: dict[str, Any] = {"node_proc": None, "temp_dir": None}


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


def check_init_kwargs(extra: dict[str, Any], temp_dir: str | None) -> str | None:
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
    """Task output on this driver's stdout: the batch in one write, so a line of it is
    never split by the driver's own prints (print() writes its pieces one by one)."""
    sys.stdout.write("".join(line + "\n" for line in lines))
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
    temp_dir = check_init_kwargs(ray_only, temp_dir)
    if current() is not None:
        if ignore_reinit_error:
            return session_info()
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
    return session_info()


def attach(core: CoreWorker, address: str, *, namespace: str | None = None,
           log_to_driver: bool = True) -> None:
    """Make ``core`` this process's connection (``init``, and the serverless client's
    remote driver)."""
    if log_to_driver:
        core.log_handler = _log_line
    core.warn_handler = _warn
    set_current(core)
    context.set_worker(core)
    context.set_namespace(namespace or "")
    _state["head_address"] = address
    atexit.register(shutdown)


def session_info() -> dict:
    core = current()
    return {"address": _state.get("head_address"), "node_id": core.node_id.hex(),
            "namespace": context.namespace()}


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


# ---------------------------------------------------------------------- objects
def get(refs, *, timeout: float | None = None):
    core = require_current()
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
    return require_current().put(value)


def wait(refs: list, *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True):
    if isinstance(refs, ObjectRef) or not isinstance(refs, (list, tuple)):
        raise TypeError("wait() takes a list of ObjectRefs")
    try:
        ids = set(map(_ref_id, refs))     # (one pass: the duplicate check and the ids)
    except AttributeError:
        raise TypeError("wait() takes a list of ObjectRefs") from None
    if len(ids) != len(refs):
        raise ValueError("wait() got duplicate ObjectRefs")
    if num_returns < 1 or num_returns > len(refs):
        raise ValueError(f"wait(num_returns={num_returns}) must be between 1 and len(refs)="
                         f"{len(refs)}")
    core = require_current()
    try:
        return core.wait(refs if type(refs) is list else list(refs), num_returns, timeout,
                         fetch_local, ids)
    except KeyboardInterrupt:
        _interrupted(core)
        raise


_ref_id = operator.attrgetter("id")


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    core = require_current()
    # a task's first return id is its task id
    if core.cancel_direct(ref.id, force):
        return
    core.send((m.CANCEL, ref.id, force))


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an actor handle, got {type(actor).__name__}")
    core = require_current()
    core.forget_direct(actor._actor_id)
    core.send((m.KILL_ACTOR, actor._actor_id, no_restart))


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
            for node in require_current().rpc("nodes")]


def cluster_resources() -> dict:
    return require_current().rpc("cluster_resources")


def available_resources() -> dict:
    return require_current().rpc("available_resources")


def get_runtime_context():
    return context.runtime_context(require_current(), context.namespace())


def get_gpu_ids() -> list:
    return context.current_gpu_ids()
