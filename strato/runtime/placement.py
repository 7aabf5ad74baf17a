"""Placement groups as pure functions: where a group's bundles go, and the resource
names that make a bundle's reservation something tasks and actors can ask for.

A reserved bundle ``index`` of group ``pg`` (hex id) with shape ``{"CPU": 2, "GPU": 1}``
adds to its node, beside what the bundle took from ``CPU``/``GPU``:

- ``CPU_group_<index>_<pg>: 2``, ``GPU_group_<index>_<pg>: 1`` (this bundle),
- ``CPU_group_<pg>: 2``, ``GPU_group_<pg>: 1`` (any bundle of the group on that node),
- ``bundle_group_<index>_<pg>`` and ``bundle_group_<pg>``: ``BUNDLE_UNITS`` each, so a
  task that asks for no resources still lands on the bundle's node.

A task or actor with ``PlacementGroupSchedulingStrategy(pg, index)`` asks for the renamed
shape (``group_shape``), so every existing rule (fits, acquire, release, waiting, the
head's actor placement) keeps working unchanged (Ray names them the same way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from strato.runtime import scheduler

PACK = "PACK"
SPREAD = "SPREAD"
STRICT_PACK = "STRICT_PACK"
STRICT_SPREAD = "STRICT_SPREAD"
STRATEGIES = (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)

BUNDLE_UNITS = 1000.0
BUNDLE_SHARE = 0.001   # what a task or actor in a bundle takes of ``bundle_group_*``
_MARK = "_group_"


def is_group_resource(name: str) -> bool:
    return _MARK in name


def is_group_shape(shape: Mapping[str, float]) -> bool:
    """A task or actor that runs in a placement group (never autoscaler demand by
    itself: its group is)."""
    return any(_MARK in k for k in shape)


def bundle_resources(pg_hex: str, index: int, shape: Mapping[str, float]) -> dict[str, float]:
    """The resources a reserved bundle adds to its node."""
    out: dict[str, float] = {}
    for name, amount in shape.items():
        if amount > 0:
            out[f"{name}_group_{index}_{pg_hex}"] = float(amount)
            out[f"{name}_group_{pg_hex}"] = float(amount)
    out[f"bundle_group_{index}_{pg_hex}"] = BUNDLE_UNITS
    out[f"bundle_group_{pg_hex}"] = BUNDLE_UNITS
    return out


def group_shape(shape: Mapping[str, float], pg_hex: str, index: int) -> dict[str, float]:
    """The shape a task or actor asks for to run in bundle ``index`` (-1: any bundle)."""
    tag = f"{index}_{pg_hex}" if index >= 0 else pg_hex
    out = {f"{name}_group_{tag}": float(amount) for name, amount in shape.items() if amount > 0}
    out[f"bundle_group_{tag}"] = BUNDLE_SHARE
    return out


def gpu_amount(shape: Mapping[str, float]) -> float:
    """GPUs a shape takes, in a bundle or not (for GPU ids and CUDA_VISIBLE_DEVICES)."""
    gpus = shape.get("GPU", 0.0)
    for name, amount in shape.items():
        if name.startswith("GPU_group_"):
            gpus += amount
    return gpus


def total_shape(bundles: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def place_bundles(bundles: Sequence[Mapping[str, float]], strategy: str,
                  nodes: Sequence[scheduler.NodeView]) -> list[bytes] | None:
    """One node per bundle, all of them or None (the group then waits): PACK on as few
    nodes as possible, SPREAD over as many as possible (best effort), STRICT_PACK on one
    node, STRICT_SPREAD on distinct nodes. Only live nodes taking work count; what they
    have available now is what they offer."""
    live = [n for n in nodes if n.alive and not n.draining]
    free = {n.node_id: dict(n.available) for n in live}
    # most headroom first: ties broken by id, so the choice is deterministic
    order = sorted(live, key=lambda n: (-_headroom(n.available), n.node_id))
    if strategy in (STRICT_PACK, PACK):
        whole = total_shape(bundles)
        for n in order:
            if scheduler.fits(whole, free[n.node_id]):
                return [n.node_id] * len(bundles)
        if strategy == STRICT_PACK:
            return None
    out: list[bytes | None] = [None] * len(bundles)
    used: list[bytes] = []
    # big bundles first: they have the fewest choices
    for i in sorted(range(len(bundles)), key=lambda i: -_headroom(bundles[i])):
        shape = bundles[i]
        if strategy == PACK:
            candidates = [nid for nid in used] + [n.node_id for n in order if n.node_id not in used]
        elif strategy == STRICT_SPREAD:
            candidates = [n.node_id for n in order if n.node_id not in used]
        else:  # SPREAD: a node not used yet if one fits, else any
            candidates = [n.node_id for n in order if n.node_id not in used] + list(used)
        node = next((nid for nid in candidates if scheduler.fits(shape, free[nid])), None)
        if node is None:
            return None
        scheduler.acquire(free[node], shape)
        if node not in used:
            used.append(node)
        out[i] = node
    return out  # type: ignore[return-value]


def _headroom(resources: Mapping[str, float]) -> float:
    return 100.0 * resources.get("GPU", 0.0) + resources.get("CPU", 0.0)
