"""Placement decisions as pure functions: which node should run a resource shape.

Kept free of I/O so the policy is unit-tested with plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

EPS = 1e-9

LOCAL = "local"
REMOTE = "remote"
WAIT = "wait"            # some node could run it later
INFEASIBLE = "infeasible"  # no node could ever run it


@dataclass(frozen=True)
class NodeView:
    node_id: bytes
    total: Mapping[str, float]
    available: Mapping[str, float]
    alive: bool = True
    draining: bool = False


def fits(shape: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    for name, amount in shape.items():
        if amount > EPS and resources.get(name, 0.0) + EPS < amount:
            return False
    return True


def place(shape: Mapping[str, float], local: NodeView | None,
          nodes: list[NodeView]) -> tuple[str, bytes | None]:
    """Prefer the local node if it has the resources now; else the remote node with the
    most headroom that has them now; else wait if any live node could ever fit it."""
    if local is not None and local.alive and not local.draining and fits(shape, local.available):
        return LOCAL, local.node_id
    best = None
    best_score = -1.0
    could_fit_later = False
    for node in nodes:
        if not node.alive or node.draining:
            continue
        if not fits(shape, node.total):
            continue
        could_fit_later = True
        if local is not None and node.node_id == local.node_id:
            continue
        if fits(shape, node.available):
            score = sum(node.available.get(k, 0.0) for k in ("CPU", "GPU"))
            if score > best_score:
                best, best_score = node, score
    if best is not None:
        return REMOTE, best.node_id
    if could_fit_later or (local is not None and local.alive and not local.draining
                           and fits(shape, local.total)):
        return WAIT, None
    return INFEASIBLE, None


def acquire(available: dict[str, float], shape: Mapping[str, float]) -> None:
    for name, amount in shape.items():
        available[name] = available.get(name, 0.0) - amount


def release(available: dict[str, float], shape: Mapping[str, float]) -> None:
    for name, amount in shape.items():
        available[name] = available.get(name, 0.0) + amount
