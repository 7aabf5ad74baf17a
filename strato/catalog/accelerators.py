"""GPUs by name: ``accelerators: A100:8`` -> the instance types to try, cheapest first.

Pure: the catalogue, the zones each type is offered in and live spot prices come in as
arguments (providers ask their cloud for the last two), so every rule is tested with
plain data. The order of what ``resolve`` returns is the order a launch tries:

1. the alternatives (``any_of``) in the order given;
2. within one, spot options (if the type is spot) by spot price (live where known, else
   the catalogue's), then the type's on-demand price, then zone order;
3. then, if the type is on-demand or may fall back to it, every type and zone again on
   demand, by on-demand price.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from strato.catalog.data import Catalog, CatalogError, InstanceOffer, normalize_accelerator

__all__ = ["AcceleratorRequest", "LaunchOption", "parse_accelerators", "parse_any_of",
           "resolve"]

_REQUEST_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.-]*)\s*(?::\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class AcceleratorRequest:
    """``A100:8``: a GPU model and how many one node must carry."""

    name: str
    count: int = 1

    def __str__(self) -> str:
        return f"{self.name}:{self.count}"


@dataclass(frozen=True)
class LaunchOption:
    """One way to launch a node: where, spot or not, what it costs.

    ``instance_type`` None means "as the node type's ``node_config`` says".
    ``price_source``: ``live`` (asked of the cloud just now), ``catalog`` or None (unknown).
    """

    zone: str | None
    spot: bool
    instance_type: str | None = None
    price: float | None = None
    price_source: str | None = None
    accelerator: str | None = None
    accelerator_count: int = 0
    vcpus: float | None = None
    memory_gib: float | None = None

    def describe(self) -> str:
        what = self.instance_type or "node_config"
        price = f", ${self.price:.4g}/h" if self.price is not None else ""
        return (f"{what} ({'spot' if self.spot else 'on-demand'} in "
                f"{self.zone or 'the default zone'}{price})")


def parse_accelerators(value: Any) -> AcceleratorRequest:
    """``"A100:8"``, ``"L4"`` or ``{L4: 1}`` -> a request; ``ValueError`` says what is wrong."""
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ValueError("give one GPU model, e.g. {A100: 8} (use any_of for "
                             "alternatives)")
        (name, count), = value.items()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"the count of {name} must be a whole number >= 1, got {count!r}")
        return AcceleratorRequest(normalize_accelerator(str(name)), count)
    if isinstance(value, str):
        m = _REQUEST_RE.match(value)
        if not m:
            raise ValueError(f"{value!r}: expected NAME or NAME:COUNT, e.g. A100:8")
        count = int(m.group(2)) if m.group(2) else 1
        if count < 1:
            raise ValueError(f"{value!r}: the count must be >= 1")
        return AcceleratorRequest(normalize_accelerator(m.group(1)), count)
    raise ValueError(f"expected NAME:COUNT (e.g. A100:8) or a mapping {{NAME: COUNT}}, "
                     f"got {type(value).__name__}")


def parse_any_of(items: Any) -> list[AcceleratorRequest]:
    """``any_of`` entries: ``A100:8`` strings or ``{accelerators: A100:8}`` mappings."""
    if not isinstance(items, list) or not items:
        raise ValueError("expected a non-empty list of alternatives, e.g. "
                         "[{accelerators: A100:8}, {accelerators: H100:8}]")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping) and "accelerators" in item:
            extra = set(item) - {"accelerators"}
            if extra:
                raise ValueError(f"[{i}]: only 'accelerators' may be given per alternative "
                                 f"(got {', '.join(sorted(map(str, extra)))})")
            item = item["accelerators"]
        try:
            out.append(parse_accelerators(item))
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
    return out


def check_available(catalog: Catalog, requests: Sequence[AcceleratorRequest], cloud: str,
                    region: str | None) -> None:
    """``CatalogError`` unless some alternative exists in ``region`` (naming what does)."""
    problems = []
    for req in requests:
        if catalog.find(accelerator=req.name, cloud=cloud, region=region,
                        min_count=req.count):
            return
        problems.append(_missing(catalog, req, cloud, region))
    raise CatalogError("; ".join(problems))


def _missing(catalog: Catalog, req: AcceleratorRequest, cloud: str, region: str | None) -> str:
    known = catalog.accelerators(cloud)
    if req.name not in known:
        return (f"no GPU called {req.name} on {cloud} in the catalogue (known: "
                f"{', '.join(known)})")
    anywhere = catalog.find(accelerator=req.name, cloud=cloud, min_count=req.count)
    if not anywhere:
        most = max(o.accelerator_count for o in catalog.find(accelerator=req.name, cloud=cloud))
        return f"no {cloud} type carries {req.count} x {req.name} (at most {most})"
    nearest = catalog.nearest_regions(cloud, req.name, region, min_count=req.count)
    what = req.name if req.count == 1 else f"{req.count} x {req.name}"
    return f"no {what} in {region}; nearest: {', '.join(nearest)}"


def resolve(catalog: Catalog, requests: Sequence[AcceleratorRequest], *, cloud: str,
            region: str | None, spot: bool, fallback_to_on_demand: bool = False,
            zones: Sequence[str] = (),
            offered: Mapping[str, Sequence[str]] | None = None,
            spot_prices: Mapping[tuple[str, str | None], float] | None = None,
            ) -> list[LaunchOption]:
    """The launch options for ``requests`` in the order to try them (module docstring).

    ``zones``: the node type's zones (None: any zone the type is ``offered`` in, else the
    cloud's default). ``offered``: instance type -> zones it is offered in (None:
    unknown, every zone is assumed). ``spot_prices``: (type, zone) -> live price.
    """
    check_available(catalog, requests, cloud, region)
    spot_prices = spot_prices or {}
    spot_options: list[tuple[tuple, LaunchOption]] = []
    demand_options: list[tuple[tuple, LaunchOption]] = []
    for ri, req in enumerate(requests):
        rows = catalog.find(accelerator=req.name, cloud=cloud, region=region,
                            min_count=req.count)
        for offer in rows:
            for zi, zone in enumerate(_zones_for(offer, zones, offered)):
                if spot:
                    live = spot_prices.get((offer.instance_type, zone))
                    price = live if live is not None else offer.spot_price
                    option = _option(offer, zone, True, price,
                                     "live" if live is not None else
                                     ("catalog" if price is not None else None))
                    rank = price if price is not None else offer.price
                    spot_options.append(((ri, rank, offer.price, zi, offer.instance_type),
                                         option))
                if not spot or fallback_to_on_demand:
                    option = _option(offer, zone, False, offer.price, "catalog")
                    demand_options.append(((ri, offer.price, zi, offer.instance_type), option))
    if not spot_options and not demand_options:
        offered_text = ", ".join(sorted(zones)) or "any zone"
        raise CatalogError(f"{' or '.join(map(str, requests))}: no type that carries it is "
                           f"offered in {offered_text} ({region})")
    spot_options.sort(key=lambda p: p[0])
    demand_options.sort(key=lambda p: p[0])
    return [o for _, o in spot_options] + [o for _, o in demand_options]


def _zones_for(offer: InstanceOffer, zones: Sequence[str],
               offered: Mapping[str, Sequence[str]] | None) -> list[str | None]:
    where = None if offered is None else offered.get(offer.instance_type, ())
    if zones:
        return [z for z in zones if where is None or z in where]
    if where is not None:
        return sorted(where)
    return [None]


def _option(offer: InstanceOffer, zone: str | None, spot: bool, price: float | None,
            source: str | None) -> LaunchOption:
    return LaunchOption(zone=zone, spot=spot, instance_type=offer.instance_type, price=price,
                        price_source=source, accelerator=offer.accelerator,
                        accelerator_count=offer.accelerator_count, vcpus=offer.vcpus,
                        memory_gib=offer.memory_gib)
