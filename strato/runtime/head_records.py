"""The head's records of nodes and actors (placement groups: ``head_groups``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from strato.runtime.messages import ActorState
from strato.runtime.spec import TaskSpec


@dataclass
class NodeRecord:
    node_id: bytes
    address: str
    total: dict
    available: dict
    labels: dict
    link: object
    last_heartbeat: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    idle_since: float | None = None
    demand: list = field(default_factory=list)
    alive: bool = True
    draining: bool = False
    drain_reason: str = ""
    store_used: int = 0
    num_actors: int = 0
    dead_reason: str = ""

    def describe(self, now: float) -> dict:
        """This node in the one schema every head RPC answers with (``HeadClient``)."""
        return {
            "node_id": self.node_id.hex(), "alive": self.alive, "draining": self.draining,
            "drain_reason": self.drain_reason, "address": self.address,
            "node_ip": self.address.rsplit(":", 1)[0], "resources": dict(self.total),
            "available": dict(self.available), "labels": dict(self.labels),
            "idle_seconds": (now - self.idle_since) if (self.alive and self.idle_since)
            else 0.0,
            "num_actors": self.num_actors, "object_store_used": self.store_used,
        }


@dataclass
class ActorRecord:
    spec: TaskSpec
    meta: dict
    blob: bytes | None
    state: ActorState = ActorState.PENDING
    node: bytes | None = None
    restarts_left: int = 0
    error: bytes | None = None
    name: str | None = None
    namespace: str = ""
    detached: bool = False
