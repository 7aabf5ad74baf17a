"""Autostop: the monitor beside the head tears the whole cluster down once it has been idle.

Idle means the head's ``activity()`` reports nothing active (no job or client session,
no actor, no busy node or pending work, no running durable call, no session in its
reconnect grace) and no node is being set up. The idle clock never starts before the
monitor did, so a freshly (re)started monitor gives the cluster a whole idle period.

Tearing down follows ``down``'s rules, from the head: tag the head going down (no
autoscaler launches for it any more), workers first (then once more any launched
meanwhile), the head last, since it is the machine the monitor runs on. ``down: false``
stops nodes where the provider can (``can_stop_nodes``; the next ``up`` starts them) and
terminates them elsewhere, saying so. The head is tagged ``TAG_AUTOSTOPPED`` so the
laptop can tell later why its cluster is gone; the next ``strato.init(cluster=...)`` or
``up`` brings it back.

The setting is the config's ``autostop:``, or what ``strato.init(cluster=...,
autostop=...)`` wrote to ``OVERRIDE_FILE`` in the monitor's directory (read every tick).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato.launcher.autoscaler.events import EventLog
from strato.launcher.config import AutostopConfig
from strato.providers.base import (
    TAG_AUTOSTOPPED,
    TAG_GOING_DOWN,
    GoingDown,
    NodeKind,
    NodeState,
)

if TYPE_CHECKING:
    from strato.launcher.cluster import Cluster

__all__ = ["OVERRIDE_FILE", "idle_seconds", "read_override", "remaining", "teardown",
           "write_override"]

OVERRIDE_FILE = "autostop.json"   # in the monitor's directory, beside spec.json
HEAD = NodeKind.HEAD.value


def idle_seconds(activity: Mapping[str, Any] | None, monitor_started: float,
                 now: float) -> float | None:
    """How long the cluster has been idle by the head's ``activity()``; None: unknown."""
    if activity is None:
        return None
    if activity.get("active"):
        return 0.0
    return max(0.0, min(float(activity.get("idle_seconds") or 0.0), now - monitor_started))


def remaining(setting: AutostopConfig, idle_s: float) -> float:
    """Seconds left until autostop after ``idle_s`` idle seconds (0: due)."""
    return max(0.0, setting.idle_minutes * 60.0 - idle_s)


def describe(seconds: float) -> str:
    """``45s``, ``7m``, ``1h05m``: for events and ``strato status``."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def override_payload(setting: AutostopConfig | None) -> str:
    return json.dumps({"autostop": setting.model_dump() if setting else None})


def write_override(path: Path, setting: AutostopConfig | None) -> None:
    path.write_text(override_payload(setting))


def read_override(path: Path | None, default: AutostopConfig | None
                  ) -> AutostopConfig | None:
    """The setting in ``path`` (written by ``init(autostop=...)``), else ``default``."""
    if path is None:
        return default
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    if not isinstance(data, dict) or "autostop" not in data:
        return default
    try:
        return AutostopConfig.parse(data["autostop"])
    except Exception:
        return default


def teardown(cluster: Cluster, setting: AutostopConfig, idle_s: float, events: EventLog,
             tick: int = 0) -> list[str]:
    """Stop or terminate every node of the cluster, the head last; returns their ids."""
    provider = cluster.provider
    nodes = [n for n in cluster.machines()
             if n.is_alive or n.state == NodeState.STOPPING]
    heads = [n for n in nodes if n.kind == HEAD]
    workers = [n for n in nodes if n.kind != HEAD]
    stop = not setting.down and provider.can_stop_nodes
    verb = "stopping" if stop else "terminating"
    note = "" if stop or setting.down else \
        f" ({cluster.kind} nodes cannot be stopped: terminating them instead)"
    events.record("autostop", f"autostop: idle for {describe(idle_s)}: {verb} "
                  f"{len(nodes)} node(s){note}", nodes=[n.id for n in nodes],
                  stopped=stop, tick=tick)
    now = time.time()
    for head in heads:  # no autoscaler launches from here on; the laptop learns why
        provider.set_tags(head.id, {TAG_GOING_DOWN: GoingDown.ALL.value,
                                    TAG_AUTOSTOPPED: str(int(now))})
    act = provider.stop_nodes if stop else provider.terminate_nodes
    done = {n.id for n in workers}
    if workers:
        act([n.id for n in workers])
    strays = [n for n in cluster.machines() if n.is_alive and n.kind != HEAD
              and n.id not in done]
    if strays:  # launched after the listing above (a bootstrap thread, another process)
        act([n.id for n in strays])
    ids = [n.id for n in workers + strays + heads]
    # the launcher's memory (the same $STRATO_HOME when the monitor runs beside it)
    state = cluster.state
    if state.get(cluster.name) is not None:
        cluster.record_costs(nodes + strays, ended=now)
        state.end_nodes(cluster.name, now, ids)
        state.set_head(cluster.name, None)
        state.add_event(cluster.name, f"autostopped: idle for {describe(idle_s)}; "
                        f"{'stopped' if stop else 'terminated'} {len(ids)} node(s)")
    if heads:  # the machine this may run on: last
        act([n.id for n in heads])
    return ids
