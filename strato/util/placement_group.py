"""Ray's ``ray.util.placement_group``: gang-reserve resources on the cluster.

``placement_group(bundles, strategy)`` asks the head to reserve every bundle (a resource
shape) at once, all or none: PACK (as few nodes as possible), SPREAD (as many as
possible, best effort), STRICT_PACK (one node), STRICT_SPREAD (one bundle per node).
Until it can, the group is pending and the autoscaler sees it as one gang demand. Tasks
and actors run in it with ``scheduling_strategy=PlacementGroupSchedulingStrategy(pg,
bundle_index)``. If a node holding one of its bundles dies, the whole group is reserved
anew and its actors restart (``max_restarts``).
"""

from __future__ import annotations

from strato.runtime import placement
from strato.runtime.api import wait
from strato.runtime.core import ObjectRef, require_current
from strato.runtime.handles import make_remote
from strato.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementGroup:
    """A handle on a placement group: ``ready()``, ``wait()``, ``bundle_specs``."""

    def __init__(self, pg_id: bytes, bundles: list[dict], strategy: str = placement.PACK):
        self.id = pg_id
        self.bundle_specs = [dict(b) for b in bundles]
        self.strategy = strategy

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> ObjectRef:
        """A ref that resolves (to this group) once every bundle is reserved."""
        check = _reservation_check().options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self, -1))
        return check.remote(self)

    def wait(self, timeout_seconds: float | None = 30) -> bool:
        """Whether the group was reserved within ``timeout_seconds``."""
        ready, _ = wait([self.ready()], timeout=timeout_seconds)
        return bool(ready)

    def __reduce__(self):
        return (PlacementGroup, (self.id, self.bundle_specs, self.strategy))

    def __eq__(self, other) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id.hex()}, {self.strategy}, {self.bundle_specs})"


_CHECK: list = []


def _reservation_check():
    """The zero-CPU task ``ready()`` runs inside the group (made once per process)."""
    if not _CHECK:
        def bundle_reservation_check(pg):
            return pg
        _CHECK.append(make_remote(bundle_reservation_check, {"num_cpus": 0, "max_retries": 0}))
    return _CHECK[0]


def _check_bundles(bundles) -> list[dict]:
    if not isinstance(bundles, (list, tuple)) or not bundles:
        raise ValueError("placement_group(bundles=...): a non-empty list of resource dicts")
    out = []
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not b:
            raise ValueError(f"placement_group: bundle {i} must be a non-empty dict of "
                             f"resources, got {b!r}")
        for name, amount in b.items():
            if not isinstance(amount, (int, float)) or amount < 0:
                raise ValueError(f"placement_group: bundle {i}[{name!r}]={amount!r} must be a "
                                 "number >= 0")
        if all(v == 0 for v in b.values()):
            raise ValueError(f"placement_group: bundle {i} asks for nothing ({b})")
        out.append({k: float(v) for k, v in b.items() if v > 0})
    return out


def placement_group(bundles: list[dict], strategy: str = placement.PACK, name: str = "",
                    lifetime: str | None = None, **_ray_only) -> PlacementGroup:
    """Reserve ``bundles`` with ``strategy``; returns at once (``ready()`` to wait).
    A group lives until ``remove_placement_group`` or until its driver exits
    (``lifetime="detached"``: until removed)."""
    if strategy not in placement.STRATEGIES:
        raise ValueError(f"placement_group(strategy={strategy!r}): one of "
                         f"{', '.join(placement.STRATEGIES)}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"placement_group(lifetime={lifetime!r}): 'detached' or None")
    shapes = _check_bundles(bundles)
    core = require_current()
    pg_id = core.ids.next()
    core.rpc("create_placement_group", pg_id, shapes, strategy, name or "", core.job_id,
             lifetime == "detached")
    return PlacementGroup(pg_id, shapes, strategy)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Give the group's bundles back; its actors are killed (no restart)."""
    require_current().rpc("remove_placement_group", placement_group.id)


def get_placement_group(name: str) -> PlacementGroup:
    pg_id, bundles, strategy = require_current().rpc("get_placement_group", name)
    return PlacementGroup(pg_id, bundles, strategy)


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict:
    """The head's record of one group (or all, by hex id): state, bundles, nodes."""
    return require_current().rpc("placement_group_table",
                       None if placement_group is None else placement_group.id)


__all__ = ["PlacementGroup", "PlacementGroupSchedulingStrategy", "get_placement_group",
           "placement_group", "placement_group_table", "remove_placement_group"]
