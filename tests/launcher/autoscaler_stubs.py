"""A stand-in for the head and the bootstrapper, so the autoscaler loop can be driven
against a cloud API fake (moto, the GCE fake) with no SSH and no runtime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strato.launcher.bootstrap import TAG_NODE_ID_LABEL
from strato.launcher.cluster import Cluster
from strato.providers.base import TAG_STATUS, Node, NodeState, NodeStatus


class StubHead:
    """The head's view as plain data: every bootstrapped, still-running machine is alive."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.started: set[str] = set()
        self.demand: list[dict[str, Any]] = []
        self.drained: list[tuple[str, str]] = []
        # what the head's activity() says (autostop); busy unless a test says otherwise
        self.idle_seconds: float | None = None

    def activity(self) -> Mapping[str, Any]:
        idle = self.idle_seconds
        return {"active": idle is None, "idle_seconds": idle or 0.0, "jobs": 0,
                "sessions": 0 if idle is not None else 1}

    def view(self) -> Mapping[str, Any]:
        # a STOPPING machine still runs its processes (a spot VM's shutdown grace)
        alive = {n.id for n in self.cluster.nodes(alive_only=False)
                 if n.is_alive or n.state == NodeState.STOPPING}
        nodes = [{"node_id": f"rt-{i}", "labels": {TAG_NODE_ID_LABEL: i}, "alive": True,
                  "draining": False, "available": {"CPU": 0.0}, "num_actors": 0,
                  "object_store_used": 0, "idle_seconds": 0.0}
                 for i in sorted(self.started & alive)]
        return {"demand": self.demand, "nodes": nodes}

    def drain(self, node_hex: str, reason: str) -> None:
        self.drained.append((node_hex, reason))

    def bootstrap(self, node: Node, setup: bool) -> None:
        self.cluster.provider.set_tags(node.id, {TAG_STATUS: NodeStatus.UP_TO_DATE.value})
        self.started.add(node.id)
