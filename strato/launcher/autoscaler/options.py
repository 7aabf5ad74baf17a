"""Where and as what a node type launches now: capacity backoffs, zone and on-demand
fallback, instance-type options, and cheapest-first order.

Pure helpers shared by `plan()` (which types it may launch, cheapest first) and the loop
(which option to try next after a capacity error, and how long to back it off).
"""

from __future__ import annotations

from collections.abc import Iterable

from strato.catalog import LaunchOption
from strato.launcher.autoscaler.records import NodeTypeInfo, TypeBackoff

BACKOFF_BASE_S = 30.0
BACKOFF_FACTOR = 2.0
BACKOFF_CAP_S = 600.0


def backoff_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th consecutive failure: 30 s, x2, capped at 10 min."""
    return min(BACKOFF_BASE_S * BACKOFF_FACTOR ** max(failures - 1, 0), BACKOFF_CAP_S)


def record_capacity_failure(
    backoffs: Iterable[TypeBackoff], node_type: str, zone: str | None, spot: bool, now: float,
    instance_type: str | None = None,
) -> list[TypeBackoff]:
    """Return backoffs with (node_type, zone, spot, instance_type) backed off one step
    longer than before."""
    key = (node_type, zone, spot, instance_type)
    kept: list[TypeBackoff] = []
    failures = 0
    for b in backoffs:
        if (b.node_type, b.zone, b.spot, b.instance_type) == key:
            failures = max(failures, b.failures)
        else:
            kept.append(b)
    failures += 1
    kept.append(TypeBackoff(node_type, zone, spot, now + backoff_delay(failures), failures,
                            instance_type))
    return kept


def clear_backoff(
    backoffs: Iterable[TypeBackoff], node_type: str, zone: str | None, spot: bool,
    instance_type: str | None = None,
) -> list[TypeBackoff]:
    """Return backoffs without (node_type, zone, spot, instance_type): a launch there just
    succeeded."""
    key = (node_type, zone, spot, instance_type)
    return [b for b in backoffs if (b.node_type, b.zone, b.spot, b.instance_type) != key]


def active_backoff(
    backoffs: Iterable[TypeBackoff], node_type: str, zone: str | None, spot: bool, now: float,
    instance_type: str | None = None,
) -> TypeBackoff | None:
    """The backoff that blocks launching node_type in zone now (zone None entries block all
    zones, instance_type None entries every instance type)."""
    for b in backoffs:
        if (
            b.node_type == node_type
            and b.spot == spot
            and b.until > now
            and (b.zone is None or b.zone == zone)
            and (b.instance_type is None or b.instance_type == instance_type)
        ):
            return b
    return None


def next_option(
    info: NodeTypeInfo, backoffs: Iterable[TypeBackoff], now: float
) -> LaunchOption | None:
    """How to launch `info` now, or None if every option is backed off.

    Types with `options` take the first one not backed off; others get `next_zone`'s
    (zone, spot) with no instance type (their node_config names it) and the type's price.
    """
    if info.options:
        backoffs = list(backoffs)
        for option in info.options:
            if active_backoff(backoffs, info.name, option.zone, option.spot, now,
                              option.instance_type) is None:
                return option
        return None
    mode = next_zone(info, backoffs, now)
    if mode is None:
        return None
    return LaunchOption(zone=mode[0], spot=mode[1])


def next_zone(
    info: NodeTypeInfo, backoffs: Iterable[TypeBackoff], now: float
) -> tuple[str | None, bool] | None:
    """Where to launch `info` now: (zone, spot), or None if every option is backed off.

    Spot types try their zones in order, then (if `fallback_to_on_demand`) on-demand in
    the same zone order. Types without zones use zone None. Types with `options`: the
    (zone, spot) of `next_option`.
    """
    if info.options:
        option = next_option(info, backoffs, now)
        return None if option is None else (option.zone, option.spot)
    backoffs = list(backoffs)
    zones: tuple[str | None, ...] = info.zones or (None,)
    modes = [True, False] if info.spot and info.fallback_to_on_demand else [info.spot]
    for spot in modes:
        for zone in zones:
            if active_backoff(backoffs, info.name, zone, spot, now) is None:
                return zone, spot
    return None


def cheapest_first(types: Iterable[NodeTypeInfo]) -> list[NodeTypeInfo]:
    """`types` cheapest first: by price per hour when every one has a price, else by
    `cost_rank`; ties by name."""
    out = list(types)
    if out and all(i.price_per_hour is not None for i in out):
        out.sort(key=lambda i: (i.price_per_hour, i.name))
    else:
        out.sort(key=lambda i: (i.cost_rank, i.name))
    return out
