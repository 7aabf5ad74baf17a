"""Ray's ``ray.util`` names that strato provides: placement groups."""

from strato.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = ["PlacementGroup", "get_placement_group", "placement_group",
           "placement_group_table", "remove_placement_group"]
