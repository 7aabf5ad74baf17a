"""``strato catalog update``: refresh the catalogue from the clouds' own APIs.

AWS: ``DescribeInstanceTypes`` per region (shapes and GPUs), the Pricing API
(``pricing`` client in us-east-1) for on-demand prices and ``DescribeSpotPriceHistory``
for current spot prices. GCP: ``MachineTypesClient.aggregated_list`` for shapes; prices
from the Cloud Billing catalog when ``google-cloud-billing`` is installed. Whatever an API
does not answer (no permission, no pricing endpoint) keeps the current catalogue's figure
and is said in the result's notes. SDKs are imported here, lazily; without credentials
or network it fails with a ``CatalogError`` saying so, never a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from strato.catalog.data import Catalog, CatalogError, InstanceOffer, normalize_accelerator

__all__ = ["UpdateResult", "update_aws", "update_gcp"]

# CPU families kept besides every type with a GPU.
CPU_FAMILIES = ("m5", "m6i", "t3", "c5", "n2", "e2")
_MIB_PER_GIB = 1024


@dataclass
class UpdateResult:
    """Rows read from a cloud and what could not be refreshed."""

    offers: list[InstanceOffer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _family(instance_type: str) -> str:
    return instance_type.split(".")[0] if "." in instance_type else instance_type.split("-")[0]


# ---------------------------------------------------------------- AWS
def _aws_client(service: str, region: str) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CatalogError("refreshing AWS figures needs boto3: pip install boto3") from e
    # a fresh session: credentials are looked up now, not cached from earlier clients
    return boto3.session.Session().client(service, region_name=region,
                                          config=Config(retries={"max_attempts": 2,
                                                                 "mode": "standard"},
                                                        connect_timeout=5, read_timeout=20))


def _aws_failure(what: str, e: Exception) -> CatalogError:
    from botocore.exceptions import NoCredentialsError, NoRegionError

    if isinstance(e, NoCredentialsError | NoRegionError):
        return CatalogError(f"{what}: no AWS credentials (set AWS_PROFILE or "
                            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return CatalogError(f"{what}: {type(e).__name__}: {e}")


def update_aws(regions: Sequence[str], current: Catalog, *,
               client: Callable[[str, str], Any] = _aws_client) -> UpdateResult:
    """Rows for every GPU type (and the CPU families above) in ``regions``."""
    from botocore.exceptions import BotoCoreError, ClientError

    result = UpdateResult()
    pricing_ok = True
    for region in regions:
        ec2 = client("ec2", region)
        types: list[dict[str, Any]] = []
        try:
            for page in ec2.get_paginator("describe_instance_types").paginate():
                types += [t for t in page["InstanceTypes"]
                          if t.get("GpuInfo") or _family(t["InstanceType"]) in CPU_FAMILIES]
        except (ClientError, BotoCoreError) as e:
            raise _aws_failure(f"AWS describe_instance_types in {region}", e) from None
        names = sorted(t["InstanceType"] for t in types)
        spot = _aws_spot_prices(ec2, names, result.notes, region)
        prices: dict[str, float] = {}
        if pricing_ok:
            try:
                prices = _aws_on_demand_prices(client("pricing", "us-east-1"), region, names)
            except (ClientError, BotoCoreError) as e:
                pricing_ok = False
                result.notes.append(f"AWS Pricing API not answered ({type(e).__name__}); "
                                    "on-demand prices kept from the current catalogue")
        for t in types:
            offer = _aws_offer(t, region, prices, spot, current)
            if offer is None:
                result.notes.append(f"aws {t['InstanceType']} in {region}: no price known; "
                                    "left out")
            else:
                result.offers.append(offer)
    return result


def _aws_offer(t: dict[str, Any], region: str, prices: dict[str, float],
               spot: dict[str, float], current: Catalog) -> InstanceOffer | None:
    name = t["InstanceType"]
    gpus = (t.get("GpuInfo") or {}).get("Gpus") or []
    acc = normalize_accelerator(gpus[0]["Name"]) if gpus else None
    count = sum(int(g.get("Count", 0)) for g in gpus)
    gpu_mem = (gpus[0].get("MemoryInfo") or {}).get("SizeInMiB", 0) / _MIB_PER_GIB if gpus else 0
    old = current.offer("aws", name, region)
    price = prices.get(name) or (old.price if old else None)
    if price is None:
        return None
    return InstanceOffer(
        cloud="aws", instance_type=name, accelerator=acc, accelerator_count=count,
        accelerator_memory_gib=round(gpu_mem), vcpus=float(t["VCpuInfo"]["DefaultVCpus"]),
        memory_gib=t["MemoryInfo"]["SizeInMiB"] / _MIB_PER_GIB, region=region, price=price,
        spot_price=spot.get(name) or (old.spot_price if old else None))


def _aws_spot_prices(ec2: Any, names: Sequence[str], notes: list[str],
                     region: str) -> dict[str, float]:
    """Cheapest current spot price of each type over the region's zones."""
    from botocore.exceptions import BotoCoreError, ClientError

    out: dict[str, float] = {}
    try:
        for start in range(0, len(names), 100):
            pages = ec2.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=list(names[start:start + 100]),
                ProductDescriptions=["Linux/UNIX"], StartTime=time.time())
            for page in pages:
                for p in page["SpotPriceHistory"]:
                    price = float(p["SpotPrice"])
                    t = p["InstanceType"]
                    out[t] = min(price, out.get(t, price))
    except (ClientError, BotoCoreError) as e:
        notes.append(f"AWS spot prices in {region} not answered ({type(e).__name__}); "
                     "kept from the current catalogue")
    return out


def _aws_on_demand_prices(pricing: Any, region: str, names: Sequence[str]) -> dict[str, float]:
    """On-demand Linux prices from the Pricing API (one filter set per type)."""
    out: dict[str, float] = {}
    for name in names:
        reply = pricing.get_products(ServiceCode="AmazonEC2", MaxResults=10, Filters=[
            {"Type": "TERM_MATCH", "Field": f, "Value": v} for f, v in (
                ("instanceType", name), ("regionCode", region), ("operatingSystem", "Linux"),
                ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"))])
        for item in reply.get("PriceList", []):
            product = json.loads(item) if isinstance(item, str) else item
            for term in (product.get("terms", {}).get("OnDemand") or {}).values():
                for dim in term.get("priceDimensions", {}).values():
                    usd = float(dim.get("pricePerUnit", {}).get("USD", 0) or 0)
                    if usd > 0:
                        out[name] = usd
    return out


# ---------------------------------------------------------------- GCP
def update_gcp(project: str, regions: Sequence[str], current: Catalog,
               machine_types_client: Any = None) -> UpdateResult:
    """Rows for GPU machine types (and the CPU families above) in ``regions``' zones.

    Shapes come from the Compute API; prices from the current catalogue unless the Cloud
    Billing catalog client is installed (it is optional). n1 + attached GPU rows keep the
    current catalogue's combinations with refreshed n1 shapes.
    """
    try:
        if machine_types_client is None:
            from google.cloud import compute_v1

            machine_types_client = compute_v1.MachineTypesClient()
        pages = machine_types_client.aggregated_list(project=project)
        seen: dict[tuple[str, str], Any] = {}
        for scope, listing in pages:
            zone = scope.rsplit("/", 1)[-1]
            region = zone.rsplit("-", 1)[0]
            if region not in regions:
                continue
            for mt in listing.machine_types or ():
                seen.setdefault((mt.name, region), mt)
    except ImportError as e:
        raise CatalogError("refreshing GCP figures needs google-cloud-compute") from e
    except Exception as e:  # google-auth and api-core raise many kinds; say which
        raise CatalogError(f"GCP machineTypes.aggregatedList for project {project!r}: "
                           f"{type(e).__name__}: {e}") from None
    result = UpdateResult()
    try:
        import google.cloud.billing  # noqa: F401
    except ImportError:
        result.notes.append("google-cloud-billing is not installed: GCP prices kept from "
                            "the current catalogue")
    for (name, region), mt in sorted(seen.items()):
        olds = [o for o in current.offers if o.cloud == "gcp" and o.instance_type == name
                and o.region == region]
        for old in olds:
            result.offers.append(replace(old, vcpus=float(mt.guest_cpus),
                                         memory_gib=round(mt.memory_mb / _MIB_PER_GIB, 2)))
        if not olds and (_family(name) in CPU_FAMILIES or mt.accelerators):
            result.notes.append(f"gcp {name} in {region}: no price known; left out")
    return result


def merge(current: Catalog, fresh: Iterable[InstanceOffer],
          clouds: Sequence[str]) -> list[InstanceOffer]:
    """The fresh rows, plus the current rows of clouds (and regions) not refreshed."""
    fresh = list(fresh)
    refreshed = {(o.cloud, o.region) for o in fresh}
    kept = [o for o in current.offers
            if o.cloud not in clouds or (o.cloud, o.region) not in refreshed]
    return kept + fresh


def refresh(*, clouds: Sequence[str], aws_regions: Sequence[str] = (),
            gcp_regions: Sequence[str] = (), gcp_project: str | None = None,
            output: str | None = None, current: Catalog | None = None,
            aws_client: Callable[[str, str], Any] = _aws_client) -> tuple[str, UpdateResult]:
    """Refresh ``clouds`` and write the catalogue (default ``$STRATO_HOME/catalog.csv``,
    which strato then reads instead of the packaged one). Returns the path and notes."""
    from datetime import date

    from strato.catalog.data import USER_CATALOG, load_catalog, write_catalog
    from strato.localfiles import strato_home

    current = current or load_catalog()
    total = UpdateResult()
    for cloud in clouds:
        if cloud == "aws":
            regions = list(aws_regions) or current.regions("aws")
            part = update_aws(regions, current, client=aws_client)
        elif cloud == "gcp":
            if not gcp_project:
                raise CatalogError("refreshing GCP figures needs a project: --project or "
                                   "GOOGLE_CLOUD_PROJECT")
            part = update_gcp(gcp_project, list(gcp_regions) or current.regions("gcp"), current)
        else:
            raise CatalogError(f"unknown cloud {cloud!r}; expected aws or gcp")
        total.offers += part.offers
        total.notes += part.notes
    if not total.offers:
        raise CatalogError("the clouds returned no instance types; catalogue left as it was")
    path = output or str(strato_home() / USER_CATALOG)
    today = date.today().isoformat()
    sources = {"aws": "AWS DescribeInstanceTypes, Pricing API, DescribeSpotPriceHistory",
               "gcp": "GCP Compute machineTypes (prices from the previous catalogue)"}
    source = "; ".join(sources[c] for c in clouds) + f" as of {today}"
    if set(clouds) != {"aws", "gcp"}:
        source += f"; other clouds from {current.source or current.path}"
    write_catalog(path, merge(current, total.offers, clouds), date=today, source=source,
                  notes=total.notes[:20])
    return path, total
