"""The serverless client: ``strato.init(cluster="cluster.yaml")`` from a laptop.

The process becomes a *remote driver*, not a node: one outbound SSH connection to the
head (none for the local provider) carries a session with the client endpoint the head
binds on 127.0.0.1. The cluster is brought up first when it is not up or its config
changed (``endpoint``); versions are checked at connect (``protocol.handshake``); code
from ``__main__`` and local modules travels by value (``code``); ``working_dir`` is
synced by content (``workdir``). Everything else is the ordinary API on a
``RemoteCoreWorker``: the same ``remote``/``get``/``put``, ``.map``, ``spawn``.
``autostop=`` sets how long the cluster may stay idle before the head's monitor tears
it down (minutes, ``{"idle_minutes": ..., "down": ...}`` or False), instead of the
config's ``autostop:``, until the next ``up``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from strato.runtime import api
from strato.runtime.core import current
from strato.runtime.remote import RemoteCoreWorker

CLUSTER_ENV = "STRATO_CLUSTER"     # `strato run` sets it: init() attaches to that cluster
#: ``init`` keywords that configure a node this process would start; a client starts none
_NODE_ONLY = ("num_cpus", "num_gpus", "resources", "object_store_memory", "temp_dir", "token")
_state: dict[str, Any] = {"cluster": None}
_UNSET: Any = object()


def init(address: str | None = None, *, cluster: str | os.PathLike | None = None,
         working_dir: str | os.PathLike | None = None, autostop: Any = _UNSET,
         **kwargs: Any) -> dict:
    """``strato.init``: with ``cluster=`` (or ``$STRATO_CLUSTER``) a serverless client of
    that cluster; otherwise the runtime's ``init`` (a local cluster, or ``address=``)."""
    if cluster is None and address is None:
        cluster = os.environ.get(CLUSTER_ENV) or None
    if cluster is None:
        if working_dir is not None:
            raise TypeError("init(working_dir=...) needs cluster=...: the directory is "
                            "synced to that cluster's head")
        if autostop is not _UNSET:
            raise TypeError("init(autostop=...) needs cluster=...: it sets when that "
                            "cluster's head tears the cluster down")
        return api.init(address, **kwargs)
    if address is not None:
        raise TypeError("init(): pass address= (a cluster this machine is part of) or "
                        "cluster= (a cluster config, as a client), not both")
    return connect(os.fspath(cluster), working_dir=working_dir, autostop=autostop, **kwargs)


def connect(config_path: str, *, working_dir: str | os.PathLike | None = None,
            namespace: str | None = None, ignore_reinit_error: bool = False,
            log_to_driver: bool = True, autostop: Any = _UNSET, **kwargs: Any) -> dict:
    """Attach this process to the cluster of ``config_path`` as a remote driver."""
    for key in _NODE_ONLY:
        if kwargs.get(key) is not None:
            raise TypeError(f"init(cluster=...): {key}= configures a node this process would "
                            "start; a client starts none (set it in the cluster config)")
    api.check_init_kwargs({k: v for k, v in kwargs.items() if k not in _NODE_ONLY}, None)
    if autostop is not _UNSET:
        from strato.launcher.config import AutostopConfig

        try:
            autostop = AutostopConfig.parse(autostop)  # checked before anything starts
        except Exception as e:
            raise TypeError(f"init(autostop=...): {e}") from None
    path = os.path.abspath(config_path)
    if current() is not None:
        if ignore_reinit_error or _state["cluster"] == path:
            return api.session_info()   # e.g. `strato run` attached already
        raise RuntimeError("strato.init() was already called; pass ignore_reinit_error=True "
                           "or call strato.shutdown() first")
    from strato.client import code, endpoint

    session = uuid.uuid4().hex
    ep, sock, answer = endpoint.open_endpoint(path, session)
    if autostop is not _UNSET:
        try:
            endpoint.set_autostop(path, autostop)
        except BaseException:
            sock.close()
            raise
    core = RemoteCoreWorker(sock, reconnect=lambda: ep.connect(session)[0],
                            reconnect_for=float(answer.get("grace_s", 60.0)))
    api.attach(core, ep.head_address, namespace=namespace, log_to_driver=log_to_driver)
    _state["cluster"] = path
    api.shutdown_hooks.append(_forget)
    if code.register_local_modules not in api.export_hooks:
        api.export_hooks.append(code.register_local_modules)
    if working_dir is not None:
        from strato.client import workdir
        core.runtime_env = {"working_dir": workdir.sync(core, os.fspath(working_dir))}
    return api.session_info()


def _forget() -> None:
    from strato.client import code

    _state["cluster"] = None
    if code.register_local_modules in api.export_hooks:
        api.export_hooks.remove(code.register_local_modules)
    code.forget()


__all__ = ["CLUSTER_ENV", "connect", "init"]
