"""What the loop sees each tick: the provider's machines and the head's view of their
runtimes, as the ``NodeInfo`` records ``plan`` reads.

Every fact read is an event on the machine's ``Instance`` record (allocated, gone,
preempted, draining, runtime back at the head), applied as it is seen. Machines the cloud
took back (spot preemption), stopped machines (a crashed local runtime) and workers whose
runtime vanished from the head (missed heartbeats) for longer than a grace period are
reported dead, so the loop terminates them and ``plan`` counts them as gone and replaces
them while ``min_workers`` or demand needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.instances import Instance, Instances
from strato.launcher.autoscaler.lifecycle import NodeState
from strato.launcher.autoscaler.records import HEAD, WORKER, NodeInfo
from strato.launcher.bootstrap import TAG_NODE_ID_LABEL
from strato.providers.base import Node
from strato.providers.base import NodeState as MachineState

if TYPE_CHECKING:  # typing only: cluster.py imports the launcher's heavier modules
    from strato.launcher.cluster import Cluster

__all__ = ["Dead", "Observer", "runtime_nodes"]

Dead = list[tuple[Node, str]]  # machines to terminate (or restart in place), and why


def runtime_nodes(view: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """Runtime nodes by the provider node id in their labels (alive ones win)."""
    out: dict[str, Mapping[str, Any]] = {}
    for rt in (view or {}).get("nodes", []):
        node_id = (rt.get("labels") or {}).get(TAG_NODE_ID_LABEL)
        if node_id and (node_id not in out or rt.get("alive")):
            out[node_id] = rt
    return out


class Observer:
    """Turns one listing of a cluster's machines into ``NodeInfo``s, updating records.

    ``lost_grace_s``: how long a set-up worker may be missing at the head before it
    counts as dead; ``ticks`` gives the tick number for events.
    """

    def __init__(self, cluster: Cluster, instances: Instances, events: EventLog, *,
                 lost_grace_s: float, ticks: Callable[[], int]) -> None:
        self.cluster = cluster
        self.instances = instances
        self.events = events
        self.lost_grace_s = lost_grace_s
        self.ticks = ticks

    def observe(self, view: Mapping[str, Any] | None, now: float
                ) -> tuple[list[NodeInfo], dict[str, Node], dict[str, Mapping[str, Any]], Dead]:
        """List the machines; returns their NodeInfos (each gone one once), the machines
        and runtime nodes by provider id, and the dead ones."""
        rt_nodes = runtime_nodes(view)
        machines = self.cluster.machines(include_terminated=True)
        dead: Dead = []
        infos = []
        for m in machines:
            info = self._node_info(m, rt_nodes.get(m.id), view is not None, now, dead)
            if info is not None:
                infos.append(info)
        self.instances.gone_unlisted({m.id for m in machines})
        return infos, {m.id: m for m in machines}, rt_nodes, dead

    def _node_info(self, node: Node, rt: Mapping[str, Any] | None, has_view: bool,
                   now: float, dead: Dead) -> NodeInfo | None:
        """One machine as ``plan`` sees it, from its record after this listing's events;
        dead ones go to ``dead`` to be terminated (or restarted in place)."""
        kind = HEAD if node.kind == HEAD else WORKER
        base: dict[str, Any] = dict(
            id=node.id, node_type=node.node_type or "", kind=kind, spot=node.spot,
            preempted=node.preempted, launch_hash_current=self.cluster.launch_hash_current(node))
        gone = NodeInfo(state=NodeState.TERMINATED, **base)
        was_terminated = node.id in self.instances and \
            self.instances[node.id].state == NodeState.TERMINATED
        rec = self.instances.for_node(node)
        if node.preempted:
            self._note_preempted(node, rec)
        if node.state == MachineState.TERMINATED:  # event: gone
            if was_terminated:
                return None  # plan was told once
            self.instances.move(node.id, NodeState.TERMINATED)
            return gone
        if rec.state == NodeState.TERMINATING:  # asked to go; the provider is on it
            return NodeInfo(state=NodeState.TERMINATING, **base)
        if kind == WORKER and node.state in (MachineState.STOPPED, MachineState.STOPPING) \
                and not (node.preempted and node.state == MachineState.STOPPING):
            why = ("its runtime process died" if self.cluster.is_local
                   else f"the machine is {node.state.value}")
            dead.append((node, "preempted by the cloud" if node.preempted else why))
            return gone
        # A preempted worker still STOPPING is in its shutdown grace (checkpoint hooks run):
        # never cut it short. It goes on below as a live node that ``plan`` replaces at
        # once and drains (or terminates if idle); the cloud stops it when the grace ends.
        if rec.state == NodeState.SETUP_FAILED:
            return NodeInfo(state=NodeState.SETUP_FAILED, setup_failures=rec.failures,
                            setup_retry_at=rec.retry_at, **base)
        if rec.state not in (NodeState.RUNNING, NodeState.DRAINING):
            return NodeInfo(state=rec.state, **base)  # ALLOCATED: set up below; SETTING_UP
        if not has_view:  # the head cannot be asked: keep everything, assume busy
            return NodeInfo(state=rec.state, draining=rec.state == NodeState.DRAINING,
                            available={} if kind == HEAD else None, **base)
        if rt is None or not rt.get("alive"):
            if kind == HEAD:
                return NodeInfo(state=NodeState.RUNNING, available={}, **base)
            if rec.missing_since is None:
                rec.missing_since = now
            if now - rec.missing_since < self.lost_grace_s:
                return NodeInfo(state=rec.state, **base)
            dead.append((node, f"runtime lost: gone from the head for "
                               f"{now - rec.missing_since:.0f}s (missed heartbeats or crashed)"))
            return gone
        rec.missing_since = None  # event: its runtime is (back) at the head
        draining = bool(rt.get("draining"))  # event: the head drains it (or stopped)
        self.instances.move(node.id, NodeState.DRAINING if draining else NodeState.RUNNING)
        idle = float(rt.get("idle_seconds") or 0.0)
        return NodeInfo(
            state=rec.state, draining=draining,
            idle_since=now - idle if idle > 0 else None,
            available=dict(rt.get("available") or {}),
            has_actors=int(rt.get("num_actors") or 0) > 0,
            holds_primary_objects=float(rt.get("object_store_used") or 0) > 0, **base)

    def _note_preempted(self, node: Node, rec: Instance) -> None:
        """Event: preempted. Logged once, as soon as the provider reports it (GCE: from its
        ``compute.instances.preempted`` operation, while the VM is still stopping)."""
        if rec.preempted:
            return
        rec.preempted = True
        what = {MachineState.TERMINATED: "reclaimed", MachineState.STOPPED: "stopped"}.get(
            node.state, "is reclaiming")
        grace = "; it keeps running through its shutdown grace" if \
            node.state == MachineState.STOPPING else ""
        self.events.record("preempted", f"the cloud {what} this spot node{grace}",
                           node=node.id, node_type=node.node_type, zone=node.zone,
                           tick=self.ticks())
