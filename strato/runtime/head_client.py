"""One way to call the head service from this machine: ``HeadClient``.

Used by the launcher's probe, the autoscaler beside the head, ``strato.checkpoint`` and
``submit --spot-recovery``. It either reuses this process's connection (``strato.init()``
ran, or this is a task or actor) or attaches to the node running from ``temp_dir`` as a
plain client: no driver, no job, never a cluster node.

Only a connection that cannot be made or is lost raises ``HeadUnreachableError``; any
other error of a call (a bad argument, a bug in an RPC) propagates as itself, so a
caller never mistakes a failing call for a head that is down.
"""

from __future__ import annotations

import os
from typing import Any

from strato.exceptions import HeadUnreachableError, StratoError
from strato.runtime.core import CoreWorker, current
from strato.runtime.session import DEFAULT_TEMP_DIR, node_files

__all__ = ["HeadClient", "HeadUnreachableError"]

DEFAULT_TIMEOUT_S = 60.0


class HeadClient:
    """Calls the head service; a context manager (``close()`` drops its own connection).

    ``temp_dir`` None: reuse this process's runtime connection if there is one, else
    attach to the node under ``$STRATO_TEMP_DIR`` (or the default temp dir). Given a
    ``temp_dir``, always attach to the node running from it. The connection opens on the
    first call; after it was lost the next call opens a new one.

    Every node comes in one schema (``nodes()``, ``demand()``): ``node_id``, ``alive``,
    ``draining``, ``drain_reason``, ``address``, ``node_ip``, ``resources``,
    ``available``, ``labels``, ``idle_seconds``, ``num_actors``, ``object_store_used``.
    """

    def __init__(self, temp_dir: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.temp_dir = temp_dir
        self.timeout = timeout
        self._core: CoreWorker | None = None
        self._own = False

    # ------------------------------------------------------------ connection
    def _connection(self) -> CoreWorker:
        core = self._core
        if core is not None and not core.closed:
            return core
        self.close()
        if self.temp_dir is None and current() is not None:
            self._core, self._own = current(), False
            return self._core
        temp_dir = os.path.abspath(self.temp_dir or os.environ.get("STRATO_TEMP_DIR")
                                   or DEFAULT_TEMP_DIR)
        nodes = node_files(temp_dir)
        if not nodes:
            raise HeadUnreachableError(f"no strato node runs on this machine (looked in "
                                       f"{temp_dir}); start one with `strato start --head`")
        try:
            core = CoreWorker(nodes[0]["socket"], "client")
        except (OSError, StratoError) as e:
            raise HeadUnreachableError(f"cannot attach to the node at {nodes[0]['socket']}: "
                                       f"{e}") from e
        self._core, self._own = core, True
        return core

    def close(self) -> None:
        """Drop the connection this client opened (a reused one stays open)."""
        core, own = self._core, self._own
        self._core, self._own = None, False
        if core is not None and own:
            core.close()

    def __enter__(self) -> HeadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ calls
    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """``rpc_<method>(*args)`` of the head service."""
        try:
            return self._connection().rpc(method, *args, timeout=timeout or self.timeout)
        except HeadUnreachableError:
            self.close()
            raise

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the head knows (dead ones too), in the one node schema."""
        return self.call("nodes")

    def demand(self) -> list[dict[str, Any]]:
        """Work waiting for room: ``[{"shape", "count", "infeasible"}]`` (actors included)."""
        return self.call("demand")

    def activity(self) -> dict[str, Any]:
        """Whether anything is active (client sessions, durable calls, jobs, actors,
        busy nodes, pending work) and since when nothing was: ``active``,
        ``last_active``, ``idle_seconds`` and the counts (the seam for autostop)."""
        return self.call("activity")

    def events(self) -> list[dict[str, Any]]:
        """The head's recent runtime events (preemption notices, dead nodes, drains)."""
        return self.call("events")

    def drain(self, node_id: str, reason: str) -> bool:
        """Stop placing work on a node (a hex id or its prefix); its actors checkpoint."""
        return self.call("drain_node", node_id, reason)

    def checkpoint_save(self, key: str, data: bytes) -> int:
        return self.call("checkpoint_save", key, data)

    def checkpoint_load(self, key: str) -> bytes | None:
        return self.call("checkpoint_load", key)

    def checkpoint_delete(self, key: str) -> bool:
        return self.call("checkpoint_delete", key)
