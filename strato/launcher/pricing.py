"""Money in the launcher: what a node type launches as and costs, and what clusters cost.

``Pricing`` binds a cluster config to its provider and the instance catalogue: node types
that name GPUs (``accelerators:`` / ``any_of:``) get their launch options (instance type,
zone, spot, price; cheapest first, live spot prices where the cloud gives them), every
launch is tagged with its price per hour (``strato-price``, in micro-dollars so that GCP
labels can hold it, and ``strato-price-source``), and ``status`` / ``cost-report`` read
those tags back. Providers without a catalogue cloud (ssh, local) have no prices.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from strato.catalog import Catalog, CatalogError, LaunchOption, load_catalog, resolve
from strato.launcher.autoscaler.records import NodeTypeInfo
from strato.launcher.config import ClusterConfig
from strato.launcher.state import NodeCostRecord
from strato.providers.base import Node, NodeProvider, NodeTypeSpec

__all__ = ["TAG_PRICE", "TAG_PRICE_SOURCE", "ClusterCost", "Pricing", "node_cost",
           "summarize_costs", "tagged_price"]

TAG_PRICE = "strato-price"                # USD per hour as launched, x 1e6 (an integer)
TAG_PRICE_SOURCE = "strato-price-source"  # live | catalog
MEMORY_FRACTION = 0.7                     # as the providers advertise ``memory``
_MICRO = 1_000_000


def price_tags(price: float | None, source: str | None) -> dict[str, str]:
    """Tags recording a launch price (none if unknown)."""
    if price is None:
        return {}
    return {TAG_PRICE: str(round(price * _MICRO)), TAG_PRICE_SOURCE: source or "catalog"}


def tagged_price(node: Node) -> tuple[float | None, str | None]:
    """The price per hour a node was launched at, from its tags."""
    raw = node.tags.get(TAG_PRICE, "")
    if not raw.isdigit():
        return None, None
    return int(raw) / _MICRO, node.tags.get(TAG_PRICE_SOURCE) or "catalog"


class Pricing:
    """Launch options, prices and resources of one cluster's node types."""

    def __init__(self, config: ClusterConfig, provider: NodeProvider,
                 catalog: Catalog | None = None):
        self.config = config
        self.provider = provider
        self._catalog = catalog
        self._options: dict[str, tuple[LaunchOption, ...]] = {}

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog()
        return self._catalog

    # ------------------------------------------------------------ per node type
    def by_gpu(self, name: str) -> bool:
        """Whether the node type names GPUs instead of an instance type."""
        return bool(self.config.accelerator_requests(name))

    def options(self, name: str) -> tuple[LaunchOption, ...]:
        """Launch options of a GPU-named type, cheapest first (``CatalogError`` if none)."""
        if name not in self._options:
            self._options[name] = tuple(self._resolve(name))
        return self._options[name]

    def _resolve(self, name: str) -> list[LaunchOption]:
        requests = self.config.accelerator_requests(name)
        cloud = self.provider.catalog_cloud
        if cloud is None:
            raise CatalogError(f"available_node_types.{name}.accelerators: provider type "
                               f"{self.config.provider.type!r} cannot choose instance "
                               "types by GPU; use aws or gcp")
        nt = self.config.node_type(name)
        spec = self.config.node_type_spec(name)
        region = self.provider.catalog_region(spec.zones[0] if spec.zones else None)
        types = sorted({o.instance_type for r in requests for o in self.catalog.find(
            accelerator=r.name, cloud=cloud, region=region, min_count=r.count)})
        offered = self.provider.zones_offering(types) if types else None
        live = self.provider.spot_prices(types) if nt.spot and types else {}
        return resolve(self.catalog, requests, cloud=cloud, region=region, spot=nt.spot,
                       fallback_to_on_demand=nt.fallback_to_on_demand, zones=spec.zones,
                       offered=offered, spot_prices=live)

    def option_price(self, spec: NodeTypeSpec, zone: str | None,
                     spot: bool) -> tuple[float | None, str | None]:
        """Price per hour of a type that names its instance type, launched in ``zone``."""
        cloud = self.provider.catalog_cloud
        instance_type = self.provider.instance_type_of(spec)
        if cloud is None or not instance_type:
            return None, None
        if spot and zone:
            live = self.provider.spot_prices([instance_type]).get((instance_type, zone))
            if live is not None:
                return live, "live"
        acc = self.provider.accelerators_of(spec)
        offer = self.catalog.offer(cloud, instance_type, self.provider.catalog_region(zone),
                                   accelerator=acc[0] if acc else None,
                                   count=acc[1] if acc else None)
        price = offer.price_for(spot) if offer else None
        return price, ("catalog" if price is not None else None)

    def price_per_hour(self, name: str) -> float | None:
        """What one node of the type costs as it launches first (spot if it is spot)."""
        try:
            if self.by_gpu(name):
                return self.options(name)[0].price
            spec = self.config.node_type_spec(name)
            nt = self.config.node_type(name)
            return self.option_price(spec, spec.zones[0] if spec.zones else None, nt.spot)[0]
        except CatalogError:
            return None

    def resources(self, name: str) -> dict[str, float]:
        """Resources a node of the type offers; GPU-named types: those of the cheapest
        option (explicit ``resources`` win)."""
        spec = self.config.node_type_spec(name)
        if not self.by_gpu(name):
            return self.provider.runtime_resources(spec)
        first = self.options(name)[0]
        found: dict[str, float] = {"GPU": float(first.accelerator_count)}
        if first.vcpus:
            found["CPU"] = float(first.vcpus)
        if first.memory_gib:
            found["memory"] = float(int(first.memory_gib * 2**30 * MEMORY_FRACTION))
        if first.accelerator:
            found[f"accelerator_type:{first.accelerator}"] = 1.0
        found.update(self.config.node_type(name).resources)
        return found

    def type_info(self, name: str, min_workers: int | None = None) -> NodeTypeInfo:
        """The node type as ``plan`` sees it: resources, limits, options and price."""
        nt = self.config.node_type(name)
        spec = self.config.node_type_spec(name)
        return NodeTypeInfo(
            name=name, resources=self.resources(name),
            min_workers=nt.min_workers if min_workers is None else min_workers,
            max_workers=nt.max_workers, spot=nt.spot,
            fallback_to_on_demand=nt.fallback_to_on_demand, zones=tuple(spec.zones),
            price_per_hour=self.price_per_hour(name),
            options=self.options(name) if self.by_gpu(name) else ())

    # ------------------------------------------------------------ one launch
    def launch(self, name: str, option: LaunchOption) -> tuple[NodeTypeSpec, dict[str, str]]:
        """The spec to create and the price tags to add for ``option`` of type ``name``."""
        spec = self.config.node_type_spec(name)
        if option.instance_type:
            spec = self.provider.with_instance_type(spec, option.instance_type,
                                                    option.accelerator,
                                                    option.accelerator_count)
            return spec, price_tags(option.price, option.price_source)
        return spec, price_tags(*self.option_price(spec, option.zone, option.spot))

    # ------------------------------------------------------------ nodes
    def node_price(self, node: Node) -> tuple[float | None, str | None]:
        """What ``node`` costs per hour: its price tag, else the catalogue's figure for its
        instance type (nodes launched before prices were tagged)."""
        price, source = tagged_price(node)
        if price is not None or self.provider.catalog_cloud is None or not node.instance_type:
            return price, source
        offer = self.catalog.offer(self.provider.catalog_cloud, node.instance_type,
                                   self.provider.catalog_region(node.zone))
        price = offer.price_for(node.spot) if offer else None
        return price, ("catalog" if price is not None else None)

    def cost_record(self, node: Node, now: float, ended: float | None = None) -> NodeCostRecord:
        """The node as a row of the cost history."""
        price, source = self.node_price(node)
        return NodeCostRecord(
            cluster=self.config.cluster_name, node_id=node.id,
            provider=self.config.provider.type, node_type=node.node_type or "",
            kind=node.kind or "", instance_type=node.instance_type or "",
            zone=node.zone or "", spot=node.spot, price=price, price_source=source or "",
            launched=node.launch_time or now, last_seen=now,
            ended=ended if ended is not None else (None if node.is_alive else now))


# ---------------------------------------------------------------- summaries
def is_estimate(price: float | None, source: str | None, spot: bool) -> bool:
    """Unknown prices and spot prices not asked of the cloud are estimates; on-demand list
    prices from the catalogue are not."""
    return price is None or (spot and source != "live")


def node_cost(price: float | None, start: float, end: float) -> tuple[float, float]:
    """(node-hours, USD) of one node between ``start`` and ``end``."""
    hours = max(end - start, 0.0) / 3600.0
    return hours, (price or 0.0) * hours


@dataclass(frozen=True)
class ClusterCost:
    """One row of ``cost-report``."""

    cluster: str
    provider: str
    launched: float
    ended: float | None  # None: the cluster is up
    nodes: int
    node_hours: float
    cost: float
    estimated: bool
    unpriced_nodes: int

    def as_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "provider": self.provider, "launched": self.launched,
                "ended": self.ended, "status": "UP" if self.ended is None else "DOWN",
                "nodes": self.nodes, "node_hours": round(self.node_hours, 6),
                "cost": round(self.cost, 6), "currency": "USD",
                "estimated": self.estimated, "unpriced_nodes": self.unpriced_nodes}


def summarize_costs(records: Iterable[NodeCostRecord], live: Mapping[str, bool],
                    now: float | None = None) -> list[ClusterCost]:
    """Per cluster: node-hours and cost from the cost history, newest cluster first.

    ``live``: cluster name -> whether it is still up (in the local state). A node of a live
    cluster with no end runs until ``now``; of a cluster that is down, until it was last
    seen (an estimate).
    """
    now = time.time() if now is None else now
    groups: dict[str, list[NodeCostRecord]] = {}
    for r in records:
        groups.setdefault(r.cluster, []).append(r)
    out = []
    for name, rows in groups.items():
        up = live.get(name, False)
        hours = cost = 0.0
        estimated = False
        for r in rows:
            if r.ended is not None:
                end = r.ended
            elif up:
                end = now
            else:
                end, estimated = r.last_seen, True
            h, c = node_cost(r.price, r.launched, end)
            hours += h
            cost += c
            estimated = estimated or is_estimate(r.price, r.price_source, r.spot)
        ends = [r.ended or r.last_seen for r in rows]
        out.append(ClusterCost(
            cluster=name, provider=rows[0].provider, launched=min(r.launched for r in rows),
            ended=None if up else max(ends), nodes=len(rows), node_hours=hours, cost=cost,
            estimated=estimated, unpriced_nodes=sum(1 for r in rows if r.price is None)))
    out.sort(key=lambda c: c.launched, reverse=True)
    return out
