"""Ray's ``ray.util.scheduling_strategies``: where a task or actor runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strato.util.placement_group import PlacementGroup


class PlacementGroupSchedulingStrategy:
    """Run inside bundle ``placement_group_bundle_index`` of ``placement_group`` (-1: any
    of its bundles), on the resources that bundle reserved."""

    def __init__(self, placement_group: PlacementGroup, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks: bool | None = None):
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def __repr__(self) -> str:
        return (f"PlacementGroupSchedulingStrategy({self.placement_group!r}, "
                f"bundle_index={self.placement_group_bundle_index})")


__all__ = ["PlacementGroupSchedulingStrategy"]
