"""The books of one `plan()` call: what every node counts as (rule 1) and how many more
nodes of each type may launch this tick (rule 4).

Min-workers, gang and demand placement and scale-down all read and write one
`Accounting`: its bins (free resources of existing, pending and just-launched nodes), its
per-type counters and the `Plan` being built. Nothing escapes but that Plan.
"""

from __future__ import annotations

import sys
from collections import Counter

from strato.launcher.autoscaler.lifecycle import GONE, PENDING, NodeState
from strato.launcher.autoscaler.options import next_zone
from strato.launcher.autoscaler.records import (
    HEAD,
    Drain,
    NodeInfo,
    Plan,
    RetrySetup,
    Snapshot,
    Terminate,
)
from strato.launcher.autoscaler.shapes import Bin, Resources, fit_count, format_shape, is_cpu_only

UPSCALING_INITIAL_NODES = 5


def protected(node: NodeInfo) -> bool:
    """Terminating this node would lose actors or the only copy of objects."""
    return node.has_actors or node.holds_primary_objects


class Accounting:
    """Mutable working state of one `plan` call; nothing escapes but the Plan."""

    def __init__(self, s: Snapshot) -> None:
        self.s = s
        self.out = Plan()
        self.bins: list[Bin] = []
        self.counted: Counter[str] = Counter()  # live workers, toward max_workers
        self.running: Counter[str] = Counter()  # base for upscaling_speed
        self.pending: Counter[str] = Counter()
        self.for_min: Counter[str] = Counter()  # current, live, non-draining workers
        self.launched: Counter[str] = Counter()
        self.launch_min: Counter[str] = Counter()
        self.launch_demand: dict[str, Counter[str]] = {}  # type -> shape text -> copies
        self.launch_demand_nodes: Counter[str] = Counter()
        self.replaces: dict[str, list[str]] = {}
        self.outdated_running: list[NodeInfo] = []
        self.idle_candidates: list[tuple[NodeInfo, float, Bin]] = []
        self.modes: dict[str, tuple[str | None, bool] | None] = {
            name: next_zone(info, s.backoffs, s.now) for name, info in s.node_types.items()
        }

    # -- rule 1: what each node counts as

    def classify(self) -> None:
        for node in self.s.nodes:
            if node.kind == HEAD:
                self._classify_head(node)
            else:
                self._classify_worker(node)

    def _classify_head(self, node: NodeInfo) -> None:
        if node.state == NodeState.SETUP_FAILED:
            if node.setup_failures < self.s.max_setup_failures:
                self._retry_setup(node)
            else:
                self.out.warnings.append(
                    f"head {node.id}: setup failed {node.setup_failures} times; "
                    "the head is never terminated by the autoscaler"
                )
        elif node.state == NodeState.RUNNING and not node.draining:
            self.bins.append(self._bin(node, registered=True))

    def _classify_worker(self, node: NodeInfo) -> None:
        s, t = self.s, node.node_type
        info = s.node_types.get(t)
        if node.state in GONE:
            if node.preempted and node.state == NodeState.TERMINATED:
                self.replaces.setdefault(t, []).append(f"preempted node {node.id}")
            return
        if node.preempted:
            self.replaces.setdefault(t, []).append(f"preempted node {node.id}")
            if node.state in PENDING or node.state == NodeState.SETUP_FAILED:
                self.terminate(node, "spot preempted before it started running")
            elif node.idle_since is not None and not protected(node):
                self.terminate(node, "spot preempted and idle: nothing left to drain")
            elif not (node.draining or node.state == NodeState.DRAINING):
                self.out.drain.append(
                    Drain(node.id, "spot preemption notice: take no new work before reclaim")
                )
            return
        outdated = info is None or not node.launch_hash_current
        why_outdated = "node type no longer in config" if info is None else "outdated launch hash"
        if node.state == NodeState.SETUP_FAILED:
            if outdated:
                self.terminate(node, f"setup failed and {why_outdated}")
            elif node.setup_failures >= s.max_setup_failures:
                self.terminate(
                    node,
                    f"setup failed {node.setup_failures} times (limit {s.max_setup_failures})",
                )
                self.replaces.setdefault(t, []).append(
                    f"node {node.id} (setup failed {node.setup_failures} times)"
                )
            else:
                if node.setup_retry_at is None or node.setup_retry_at <= s.now:
                    self._retry_setup(node)
                self._count_pending(node)
            return
        if node.state in PENDING:
            if outdated:
                self.terminate(node, f"{why_outdated}; not running yet")
            else:
                self._count_pending(node)
            return
        # RUNNING or DRAINING
        self.counted[t] += 1
        self.running[t] += 1
        if node.draining or node.state == NodeState.DRAINING:
            if node.idle_since is not None and not protected(node):
                self.terminate(node, "drained and idle")
                self.counted[t] -= 1
            return
        if outdated:
            self.outdated_running.append(node)
            return
        self.for_min[t] += 1
        b = self._bin(node, registered=True)
        self.bins.append(b)
        if node.idle_since is not None:
            self.idle_candidates.append((node, node.idle_since, b))

    def _count_pending(self, node: NodeInfo) -> None:
        self.counted[node.node_type] += 1
        self.pending[node.node_type] += 1
        self.for_min[node.node_type] += 1
        info = self.s.node_types[node.node_type]
        self.bins.append(Bin(node.node_type, dict(info.resources), node.id))

    def _bin(self, node: NodeInfo, registered: bool) -> Bin:
        info = self.s.node_types.get(node.node_type)
        free = node.available if node.available is not None else (info.resources if info else {})
        return Bin(node.node_type, dict(free), node.id, registered=registered)

    def terminate(self, node: NodeInfo, reason: str) -> None:
        self.out.terminate.append(Terminate(node.id, reason))

    def _retry_setup(self, node: NodeInfo) -> None:
        attempt = node.setup_failures + 1
        self.out.retry_setup.append(
            RetrySetup(
                node.id,
                f"setup failed {node.setup_failures} time(s); "
                f"attempt {attempt} of {self.s.max_setup_failures}",
            )
        )

    # -- rule 4: limits on every launch

    def headroom(self, t: str) -> int:
        """How many more nodes of type t may be launched this tick."""
        info, s = self.s.node_types[t], self.s
        if self.modes[t] is None:
            return 0
        room = sys.maxsize
        if info.max_workers is not None:
            room = min(room, info.max_workers - self.counted[t] - self.launched[t])
        if s.max_workers is not None:
            total = sum(self.counted.values()) + sum(self.launched.values())
            room = min(room, s.max_workers - total)
        allowed_pending = max(
            UPSCALING_INITIAL_NODES, int(s.upscaling_speed * max(self.running[t], 1))
        )
        room = min(room, allowed_pending - self.pending[t] - self.launched[t])
        return max(room, 0)

    def blocker(self, t: str) -> str:
        """Why type t cannot launch more right now (for warnings)."""
        info, s = self.s.node_types[t], self.s
        if self.modes[t] is None:
            return f"{t} backed off after capacity errors"
        if info.max_workers is not None and (
            self.counted[t] + self.launched[t] >= info.max_workers
        ):
            return f"{t} at max_workers {info.max_workers}"
        total = sum(self.counted.values()) + sum(self.launched.values())
        if s.max_workers is not None and total >= s.max_workers:
            return f"global max_workers {s.max_workers} reached"
        return f"{t} at upscaling_speed limit of pending nodes"

    def reserve(self, t: str, want: int) -> int:
        """Launch up to `want` nodes of type t, as many as its headroom allows."""
        n = min(want, self.headroom(t))
        self.launched[t] += n
        return n

    # -- shared by the placement rules

    def avoid_gpu(self, shape: Resources) -> bool:
        """CPU-only demand stays off GPU nodes while a CPU-only type could take it."""
        return is_cpu_only(shape) and any(
            not i.has_gpu and fit_count(i.resources, shape) > 0 for i in self.s.node_types.values()
        )

    def is_gpu_bin(self, b: Bin) -> bool:
        info = self.s.node_types.get(b.node_type)
        return info.has_gpu if info is not None else b.free.get("GPU", 0.0) > 0

    def note_demand(self, t: str, shape: Resources, copies: int) -> None:
        self.launch_demand.setdefault(t, Counter())[format_shape(shape)] += copies
