"""What EC2 offers: instance types (CPUs, GPUs, memory), default images, the zones that
offer a type and spot prices. Mixed into ``AWSProvider`` (``provider.py``).

Default image: when ``node_config`` has no ``ImageId`` the newest AMI (by CreationDate,
matching the instance type's architecture) of the first of these searches that finds one
is used: the AWS Deep Learning Base GPU AMI (Ubuntu 22.04, owner ``amazon``), Canonical's
Ubuntu 22.04 server image, any Canonical/Amazon Ubuntu server image, then any
Amazon-owned image (the last two exist so moto, which has only old images, works).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from strato.exceptions import ConfigError
from strato.providers.aws.api import sdk_errors
from strato.providers.base import NodeTypeSpec

# Share of the machine's memory advertised as the ``memory`` resource; the rest is left
# to the OS and the object store (the same split Ray uses).
MEMORY_FRACTION = 0.7

_CANONICAL = "099720109477"
# (owners, name pattern or None) tried in order; see the module docstring.
_IMAGE_SEARCHES: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("amazon",), "Deep Learning*Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*"),
    ((_CANONICAL,), "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-*-server-*"),
    ((_CANONICAL, "amazon"), "ubuntu/images/hvm-ssd*/ubuntu-*-server-*"),
    (("amazon",), None),
)

_MIB = 1024 * 1024
SPOT_PRICE_TTL_S = 300.0  # spot prices asked of EC2 are reused this long

# Instance-type facts never change; shared by every provider object in the process.
_INSTANCE_TYPE_CACHE: dict[tuple[str | None, str], dict[str, Any]] = {}


class OfferingsMixin:
    """Instance types, images, resources and the catalogue of ``AWSProvider``."""

    # kept by AWSProvider (its __init__ says what each is), as are ``ec2``, ``_call``
    # and ``resource_name``
    provider_config: dict[str, Any]
    cluster_name: str
    _images: dict[str, str]
    _spot_cache: dict[tuple[str, ...], tuple[float, dict[tuple[str, str], float]]]

    # ------------------------------------------------------------------ images and types
    def instance_type_info(self, instance_type: str) -> dict[str, Any]:
        """DescribeInstanceTypes entry for one type (cached for the process)."""
        key = (self.provider_config.get("region"), instance_type)
        if key not in _INSTANCE_TYPE_CACHE:
            types = self._call("describe_instance_types",
                               InstanceTypes=[instance_type])["InstanceTypes"]
            if not types:
                raise ConfigError(f"unknown instance type {instance_type!r}")
            _INSTANCE_TYPE_CACHE[key] = types[0]
        return _INSTANCE_TYPE_CACHE[key]

    def default_image(self, instance_type: str | None) -> str:
        """AMI used when node_config has no ImageId (see the module docstring)."""
        arch = "x86_64"
        if instance_type:
            archs = self.instance_type_info(instance_type).get(
                "ProcessorInfo", {}).get("SupportedArchitectures", [])
            arch = "arm64" if archs and "x86_64" not in archs and "arm64" in archs else arch
        if arch not in self._images:
            for owners, pattern in _IMAGE_SEARCHES:
                filters = [{"Name": "architecture", "Values": [arch]},
                           {"Name": "state", "Values": ["available"]}]
                if pattern:
                    filters.append({"Name": "name", "Values": [pattern]})
                images = self._call("describe_images", Owners=list(owners),
                                    Filters=filters)["Images"]
                if images:
                    newest = max(images, key=lambda i: i.get("CreationDate", ""))
                    self._images[arch] = newest["ImageId"]
                    break
            else:
                raise ConfigError(f"no default {arch} AMI found; set node_config.ImageId")
        return self._images[arch]

    def runtime_resources(self, spec: NodeTypeSpec) -> dict[str, float]:
        """CPU, GPU, memory and accelerator_type from the instance type; spec.resources win."""
        instance_type = spec.node_config.get("InstanceType")
        if not instance_type:
            return dict(spec.resources)
        info = self.instance_type_info(instance_type)
        found: dict[str, float] = {}
        vcpus = info.get("VCpuInfo", {}).get("DefaultVCpus")
        if vcpus:
            found["CPU"] = float(vcpus)
        gpus = info.get("GpuInfo", {}).get("Gpus", [])
        if gpus:
            found["GPU"] = float(sum(g.get("Count", 0) for g in gpus))
            for gpu in gpus:
                if gpu.get("Name"):
                    found[f"accelerator_type:{gpu['Name']}"] = 1.0
        mib = info.get("MemoryInfo", {}).get("SizeInMiB")
        if mib:
            found["memory"] = float(int(mib * _MIB * MEMORY_FRACTION))
        found.update(spec.resources)
        return found

    # ------------------------------------------------------------------ catalogue
    catalog_cloud = "aws"

    def instance_type_of(self, spec: NodeTypeSpec) -> str | None:
        return spec.node_config.get("InstanceType") or None

    def with_instance_type(self, spec: NodeTypeSpec, instance_type: str,
                           accelerator: str | None = None,
                           accelerator_count: int = 0) -> NodeTypeSpec:
        """EC2 types carry their GPUs: only ``InstanceType`` changes."""
        return dataclasses.replace(spec, node_config={**spec.node_config,
                                                      "InstanceType": instance_type})

    def zones_offering(self, instance_types: Sequence[str]) -> dict[str, list[str]] | None:
        """DescribeInstanceTypeOfferings by zone; None if EC2 does not answer."""
        out: dict[str, list[str]] = {t: [] for t in instance_types}
        try:
            pages = self.ec2.get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": list(instance_types)}])
            for page in pages:
                for o in page["InstanceTypeOfferings"]:
                    out.setdefault(o["InstanceType"], []).append(o["Location"])
        except sdk_errors():
            return None
        return {t: sorted(zones) for t, zones in out.items()}

    def spot_prices(self, instance_types: Sequence[str]) -> dict[tuple[str, str], float]:
        """The latest DescribeSpotPriceHistory price of each (type, zone); {} on errors."""
        now = time.time()
        key = tuple(sorted(instance_types))
        cached = self._spot_cache.get(key)
        if cached and now - cached[0] < SPOT_PRICE_TTL_S:
            return cached[1]
        latest: dict[tuple[str, str], tuple[float, float]] = {}
        try:
            pages = self.ec2.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=list(key), ProductDescriptions=["Linux/UNIX"], StartTime=now)
            for page in pages:
                for p in page["SpotPriceHistory"]:
                    stamp = p.get("Timestamp")
                    when = stamp.timestamp() if hasattr(stamp, "timestamp") else 0.0
                    pair = (p["InstanceType"], p["AvailabilityZone"])
                    if pair not in latest or when >= latest[pair][0]:
                        latest[pair] = (when, float(p["SpotPrice"]))
        except (*sdk_errors(), ValueError, KeyError):
            return {}
        prices = {pair: price for pair, (_, price) in latest.items()}
        self._spot_cache[key] = (now, prices)
        return prices

