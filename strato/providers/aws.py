"""AWS EC2 node provider: key pair, security group, on-demand and spot instances.

boto3 is imported only inside ``make_ec2_client`` so users of other clouds never need it.
Every EC2 call goes through that one factory, which honours an endpoint override
(``provider.endpoint_url``, else ``AWS_ENDPOINT_URL_EC2``, else ``AWS_ENDPOINT_URL``) so
tests point the provider at moto.

Default image: when ``node_config`` has no ``ImageId`` the newest AMI (by CreationDate,
matching the instance type's architecture) of the first of these searches that finds one
is used: the AWS Deep Learning Base GPU AMI (Ubuntu 22.04, owner ``amazon``), Canonical's
Ubuntu 22.04 server image, any Canonical/Amazon Ubuntu server image, then any
Amazon-owned image (the last two exist so moto, which has only old images, works).

The head's credentials: the monitor beside the head launches, tags, stops and terminates
instances with the head's own IAM role, never the laptop's keys. ``prepare`` creates
(when absent) a role ``strato-head-<cluster>`` that only EC2 may assume, with an inline
policy of exactly the EC2 calls the monitor makes (state-changing ones limited to
instances tagged with this cluster), and an instance profile of the same name; the head
is launched with it (``IamInstanceProfile``). Workers get none: they never call AWS.
``provider.iam_instance_profile`` names an existing profile to use instead;
``provider.head_credentials`` (set by the launcher: true where the monitor runs on the
head) must be true for any of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from strato.exceptions import CapacityError, ConfigError, ProviderError
from strato.localfiles import strato_home, write_secret
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    TAG_NAME,
    TAG_OWNER,
    ConfigProblem,
    Node,
    NodeProvider,
    NodeState,
    NodeTypeSpec,
    SpotIdiom,
)
from strato.providers.keys import public_key_from_private

# Error codes that all mean "no capacity for this request here": the autoscaler treats
# them alike (next zone, then on-demand), whatever EC2's wording.
CAPACITY_ERROR_CODES = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "Unsupported",  # e.g. the zone does not offer this instance type
    "InsufficientFreeAddressesInSubnet",
})

SPOT_TERMINATION_CODE = "Server.SpotInstanceTermination"

# Share of the machine's memory advertised as the ``memory`` resource; the rest is left
# to the OS and the object store (the same split Ray uses).
MEMORY_FRACTION = 0.7

_ALIVE_STATES = ("pending", "running", "stopping", "stopped")
_GONE_STATES = ("shutting-down", "terminated")
_STATE_MAP = {
    "pending": NodeState.PENDING,
    "running": NodeState.RUNNING,
    "stopping": NodeState.STOPPING,
    "stopped": NodeState.STOPPED,
    "shutting-down": NodeState.TERMINATED,
    "terminated": NodeState.TERMINATED,
}

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
_TERMINATE_BATCH = 1000  # TerminateInstances limit per call

# Instance-type facts never change; shared by every provider object in the process.
_INSTANCE_TYPE_CACHE: dict[tuple[str | None, str], dict[str, Any]] = {}


def make_ec2_client(provider_config: Mapping[str, Any]) -> Any:
    """Build the one EC2 client the provider uses (lazy boto3 import, endpoint override)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - depends on the user's environment
        raise ConfigError("provider.type 'aws' needs boto3: pip install boto3") from e
    endpoint = (provider_config.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_EC2")
                or os.environ.get("AWS_ENDPOINT_URL")
                or None)
    return boto3.client(
        "ec2",
        region_name=provider_config.get("region"),
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def make_iam_client(provider_config: Mapping[str, Any]) -> Any:
    """The IAM client ``prepare`` uses for the head's role (endpoint override:
    ``provider.iam_endpoint_url``, else ``AWS_ENDPOINT_URL_IAM`` / ``AWS_ENDPOINT_URL``)."""
    import boto3
    from botocore.config import Config

    endpoint = (provider_config.get("iam_endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_IAM")
                or os.environ.get("AWS_ENDPOINT_URL")
                or None)
    return boto3.client("iam", region_name=provider_config.get("region"),
                        endpoint_url=endpoint,
                        config=Config(retries={"max_attempts": 5, "mode": "standard"}))


# What the monitor on the head calls (strato.launcher.autoscaler through this provider):
# reads everywhere (EC2 has no resource-level permissions for Describe*), launches, and
# changes only to instances tagged with its own cluster.
HEAD_READ_ACTIONS = (
    "ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeInstanceTypeOfferings",
    "ec2:DescribeSpotPriceHistory", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
    "ec2:DescribeImages", "ec2:DescribeKeyPairs", "ec2:DescribeVpcs",
)
HEAD_CHANGE_ACTIONS = ("ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances",
                       "ec2:StartInstances")
_EC2_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
    "Action": "sts:AssumeRole"}]}
PROFILE_PROPAGATION_S = 60.0  # a new instance profile may be unknown to EC2 this long


def head_policy(cluster_name: str) -> dict[str, Any]:
    """The head role's inline policy: only what the monitor does, on its own cluster."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "Read", "Effect": "Allow", "Action": list(HEAD_READ_ACTIONS), "Resource": "*"},
        {"Sid": "Launch", "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"},
        {"Sid": "TagAtLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Sid": "OwnCluster", "Effect": "Allow", "Action": list(HEAD_CHANGE_ACTIONS),
         "Resource": "*",
         "Condition": {"StringEquals": {f"ec2:ResourceTag/{TAG_CLUSTER}": cluster_name}}},
    ]}


def head_role_name(cluster_name: str) -> str:
    """``strato-head-<cluster>`` (IAM allows 64 characters: a long name keeps a hash)."""
    name = f"strato-head-{cluster_name}"
    if len(name) <= 64:
        return name
    return f"{name[:55]}-{hashlib.sha256(cluster_name.encode()).hexdigest()[:8]}"


def _error_code(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") or ""


def _error_message(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Message", "") or str(exc)


def _sdk_errors() -> tuple[type[Exception], ...]:
    """botocore's error bases, imported lazily like boto3 itself."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def _as_list(value: Any) -> list[str]:
    """Zones come as a YAML list or Ray's comma-separated string."""
    if not value:
        return []
    if isinstance(value, str):
        return [z.strip() for z in value.split(",") if z.strip()]
    return [str(z) for z in value]


def _tags_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags or ()}


def _aws_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": str(v)} for k, v in tags.items()]


def _key_body(public_key: str) -> str:
    """``type base64`` of a public key line, without the comment, for comparison."""
    return " ".join(public_key.split()[:2])


def _key_digest(public_key: str) -> str:
    """A short digest naming a key pair after its key."""
    return hashlib.sha256(_key_body(public_key).encode()).hexdigest()[:12]


class AWSProvider(NodeProvider):
    """Nodes are EC2 instances tagged with the cluster name; state lives only in AWS tags."""

    needs_prepare_to_reach_nodes = True
    default_ssh_user = "ubuntu"
    can_stop_nodes = True

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[ConfigProblem]:
        provider = config.get("provider")
        if isinstance(provider, Mapping) and not provider.get("region"):
            return [ConfigProblem(("provider", "region"), "required for provider type 'aws'")]
        return []

    @classmethod
    def spot_idiom(cls, node_config: Mapping[str, Any]) -> SpotIdiom | None:
        """``InstanceMarketOptions: {MarketType: spot}`` (with ``SpotOptions.MaxPrice``)."""
        market = node_config.get("InstanceMarketOptions")
        if not isinstance(market, Mapping) or \
                str(market.get("MarketType", "")).lower() != "spot":
            return None
        options = market.get("SpotOptions")
        price = options.get("MaxPrice") if isinstance(options, Mapping) else None
        try:
            max_price = float(price) if price not in (None, "") else None
        except (TypeError, ValueError):
            max_price = None
        return SpotIdiom(("InstanceMarketOptions", "MarketType"),
                         "InstanceMarketOptions.MarketType: spot", max_price)

    @property
    def spot_notice(self) -> str | None:
        return "aws"  # spot/instance-action in the instance metadata

    def __init__(self, provider_config: Mapping[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self._ec2: Any = None
        self._prepared: dict[str, Any] | None = None
        self._subnets: dict[str, str] = {}
        self._vpc_id: str | None = None
        self._images: dict[str, str] = {}
        self._spot_cache: dict[tuple[str, ...], tuple[float, dict[tuple[str, str], float]]] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def ec2(self) -> Any:
        """The boto3 EC2 client, built on first use by ``make_ec2_client``."""
        if self._ec2 is None:
            self._ec2 = make_ec2_client(self.provider_config)
        return self._ec2

    @property
    def resource_name(self) -> str:
        """Name of the key pair and security group of this cluster."""
        return f"strato-{self.cluster_name}"

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """Call EC2, turning SDK errors into ``ProviderError`` with AWS's own message."""
        try:
            return getattr(self.ec2, operation)(**kwargs)
        except _sdk_errors() as e:
            code = _error_code(e) or type(e).__name__
            raise ProviderError(f"AWS {operation} failed ({code}): {_error_message(e)}") from e

    # ------------------------------------------------------------------ prepare
    def prepare(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """Ensure key pair, security group and per-zone subnets exist; safe to repeat."""
        auth = dict(config.get("auth") or {})
        key_name, key_path = self._ensure_key_pair(auth)
        vpc_id = self._default_vpc()
        group_id = self._ensure_security_group(vpc_id)
        zones: list[str] = []
        for node_type in (config.get("available_node_types") or {}).values():
            zones += _as_list((node_type or {}).get("zones"))
        zones += _as_list(self.provider_config.get("availability_zone"))
        subnets = {zone: self._subnet_for_zone(zone) for zone in dict.fromkeys(zones)}
        self._prepared = {
            "key_name": key_name,
            "private_key_path": key_path,
            "security_group_id": group_id,
            "vpc_id": vpc_id,
            "subnets": subnets,
        }
        profile = self._head_instance_profile(config)
        if profile:
            self._prepared["head_instance_profile"] = profile
        return dict(self._prepared)

    # ------------------------------------------------------------------ head credentials
    def _head_instance_profile(self, config: Mapping[str, Any]) -> dict[str, str] | None:
        """The ``IamInstanceProfile`` the head is launched with (see the module docstring)."""
        named = self.provider_config.get("iam_instance_profile")
        if named:
            key = "Arn" if str(named).startswith("arn:") else "Name"
            return {key: str(named)}
        if not self.provider_config.get("head_credentials"):
            return None
        head_type = config.get("head_node_type")
        head_config = ((config.get("available_node_types") or {}).get(head_type) or {}) \
            .get("node_config") or {}
        if head_config.get("IamInstanceProfile"):
            return None  # the user's node_config names one: it wins
        try:
            return {"Arn": self._ensure_head_role()}
        except _sdk_errors() as e:
            raise ProviderError(
                f"AWS IAM {_error_code(e) or type(e).__name__}: could not set up the head's "
                f"role and instance profile {head_role_name(self.cluster_name)!r} (the "
                f"monitor on the head needs them to launch workers and autostop): "
                f"{_error_message(e)}. Set provider.iam_instance_profile to an existing "
                "profile, or provider.monitor: local") from e

    def _ensure_head_role(self) -> str:
        """Role + inline policy + instance profile, each created when absent; its ARN."""
        iam = make_iam_client(self.provider_config)
        name = head_role_name(self.cluster_name)
        tags = [{"Key": TAG_CLUSTER, "Value": self.cluster_name}]
        try:
            iam.get_role(RoleName=name)
        except _sdk_errors() as e:
            if _error_code(e) != "NoSuchEntity":
                raise
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(_EC2_TRUST),
                            Description=f"strato: the head of cluster {self.cluster_name} "
                                        "(its monitor's EC2 calls)", Tags=tags)
        # kept current: a newer strato may call one more action
        iam.put_role_policy(RoleName=name, PolicyName="strato-monitor",
                            PolicyDocument=json.dumps(head_policy(self.cluster_name)))
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except _sdk_errors() as e:
            if _error_code(e) != "NoSuchEntity":
                raise
            profile = iam.create_instance_profile(InstanceProfileName=name,
                                                  Tags=tags)["InstanceProfile"]
        if name not in {r.get("RoleName") for r in profile.get("Roles", [])}:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        return str(profile["Arn"])

    def adopt_facts(self, facts: Mapping[str, Any]) -> None:
        """Launch with the key pair and security group ``prepare`` chose (the key pair's
        name may be qualified: another owner's pair holds the plain one)."""
        if facts.get("key_name") and facts.get("security_group_id") and self._prepared is None:
            self._prepared = {"key_name": facts["key_name"],
                              "security_group_id": facts["security_group_id"],
                              "vpc_id": facts.get("vpc_id"),
                              "subnets": dict(facts.get("subnets") or {})}
            if facts.get("head_instance_profile"):
                self._prepared["head_instance_profile"] = dict(facts["head_instance_profile"])

    def _ensure_key_pair(self, auth: Mapping[str, Any]) -> tuple[str, str]:
        name = self.resource_name
        existing = self._describe_key_pair(name)
        if auth.get("ssh_private_key"):
            private_path = str(Path(auth["ssh_private_key"]).expanduser())
            if auth.get("ssh_public_key"):
                public = Path(auth["ssh_public_key"]).expanduser().read_text().strip()
            else:
                public = public_key_from_private(private_path)
            if existing is not None and \
                    _key_body(existing.get("PublicKey", "")) != _key_body(public):
                # A different key under our name: another owner's cluster of this name
                # (or an earlier auth key). Never replace it: use a name of this key's own.
                name = f"{name}-{_key_digest(public)}"
                existing = self._describe_key_pair(name)
            if existing is None:
                self._call("import_key_pair", KeyName=name, PublicKeyMaterial=public.encode(),
                           TagSpecifications=[{"ResourceType": "key-pair",
                                               "Tags": _aws_tags(self._resource_tags())}])
            elif _key_body(existing.get("PublicKey", "")) != _key_body(public):
                raise ProviderError(f"key pair {name!r} holds another key than "
                                    f"{auth.get('ssh_private_key')}; refusing to replace it")
            return name, private_path

        pem = strato_home() / "keys" / f"{name}.pem"
        if existing is not None and not self._holds(existing, pem):
            # Not the key we made (another owner's, or our private key is lost): never
            # replace it; this owner's key pair gets a name of its own.
            name = f"{name}-{self.provider_config.get('owner') or 'owner'}"
            pem = strato_home() / "keys" / f"{name}.pem"
            existing = self._describe_key_pair(name)
        if existing is not None:
            if self._holds(existing, pem):
                return name, str(pem)
            raise ProviderError(
                f"key pair {name!r} exists in AWS but this machine does not hold its private "
                f"key ({pem}); set auth.ssh_private_key, or delete that key pair if it is "
                f"yours (aws ec2 delete-key-pair --key-name {name})")
        created = self._call("create_key_pair", KeyName=name,
                             TagSpecifications=[{"ResourceType": "key-pair",
                                                 "Tags": _aws_tags(self._resource_tags())}])
        write_secret(pem, created["KeyMaterial"])
        return name, str(pem)

    def _resource_tags(self) -> dict[str, str]:
        tags = {TAG_CLUSTER: self.cluster_name}
        if self.provider_config.get("owner"):
            tags[TAG_OWNER] = str(self.provider_config["owner"])
        return tags

    @staticmethod
    def _holds(existing: Mapping[str, Any], pem: Path) -> bool:
        """Whether ``pem`` is the private key of the key pair ``existing``."""
        if not pem.exists():
            return False
        public = existing.get("PublicKey")
        if not public:  # not reported: trust the file we wrote when we created it
            return True
        try:
            return _key_body(public_key_from_private(pem)) == _key_body(public)
        except Exception:
            return False

    def _describe_key_pair(self, name: str) -> dict[str, Any] | None:
        try:
            pairs = self.ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)
        except _sdk_errors() as e:
            if _error_code(e) == "InvalidKeyPair.NotFound":
                return None
            raise ProviderError(f"AWS describe_key_pairs failed: {_error_message(e)}") from e
        return pairs["KeyPairs"][0] if pairs["KeyPairs"] else None

    def _default_vpc(self) -> str:
        if self._vpc_id is None:
            vpcs = self._call("describe_vpcs",
                              Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                raise ConfigError(f"region {self.provider_config.get('region')!r} has no "
                                  "default VPC; strato needs one (aws ec2 create-default-vpc)")
            self._vpc_id = vpcs[0]["VpcId"]
        return self._vpc_id

    def _find_security_group(self, vpc_id: str) -> dict[str, Any] | None:
        groups = self._call("describe_security_groups", Filters=[
            {"Name": "group-name", "Values": [self.resource_name]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ])["SecurityGroups"]
        return groups[0] if groups else None

    def _ensure_security_group(self, vpc_id: str) -> str:
        group = self._find_security_group(vpc_id)
        if group is None:
            group_id = self._call(
                "create_security_group", GroupName=self.resource_name, VpcId=vpc_id,
                Description=f"strato cluster {self.cluster_name}: SSH in, all traffic within",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": _aws_tags(
                    {TAG_CLUSTER: self.cluster_name})}],
            )["GroupId"]
            existing: list[dict[str, Any]] = []
        else:
            group_id = group["GroupId"]
            existing = group.get("IpPermissions", [])
        wanted = [
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
             "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "strato SSH"}]},
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]},
        ]
        missing = [p for p in wanted if not _has_permission(existing, p)]
        if missing:
            try:
                self.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=missing)
            except _sdk_errors() as e:
                if _error_code(e) != "InvalidPermission.Duplicate":
                    raise ProviderError(
                        f"AWS authorize_security_group_ingress failed: {_error_message(e)}"
                    ) from e
        return group_id

    def _subnet_for_zone(self, zone: str) -> str:
        if zone not in self._subnets:
            subnets = self._call("describe_subnets", Filters=[
                {"Name": "availability-zone", "Values": [zone]},
                {"Name": "default-for-az", "Values": ["true"]},
            ])["Subnets"]
            if not subnets:
                raise ConfigError(f"zone {zone!r} has no default subnet in region "
                                  f"{self.provider_config.get('region')!r}")
            self._subnets[zone] = subnets[0]["SubnetId"]
        return self._subnets[zone]

    def _launch_resources(self) -> dict[str, Any]:
        """prepare()'s facts, or the same looked up by name in a fresh process."""
        if self._prepared is None:
            vpc_id = self._default_vpc()
            group = self._find_security_group(vpc_id)
            if group is None or self._describe_key_pair(self.resource_name) is None:
                raise ProviderError(f"security group or key pair {self.resource_name!r} "
                                    "not found; run prepare (strato up) first")
            self._prepared = {"key_name": self.resource_name,
                              "security_group_id": group["GroupId"],
                              "vpc_id": vpc_id, "subnets": {}}
        return self._prepared

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
        except _sdk_errors():
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
        except (*_sdk_errors(), ValueError, KeyError):
            return {}
        prices = {pair: price for pair, (_, price) in latest.items()}
        self._spot_cache[key] = (now, prices)
        return prices

    # ------------------------------------------------------------------ nodes
    def create_nodes(self, spec: NodeTypeSpec, count: int, tags: Mapping[str, str], *,
                     zone: str | None = None, spot: bool | None = None) -> list[Node]:
        """run_instances for ``count`` nodes; capacity failures raise ``CapacityError``."""
        if count <= 0:
            return []
        use_spot = spec.spot if spot is None else spot
        zone = zone or (list(spec.zones) or _as_list(
            self.provider_config.get("availability_zone")) or [None])[0]
        resources = self._launch_resources()

        all_tags = {TAG_NAME: f"strato-{self.cluster_name}-{tags.get(TAG_KIND, 'worker')}",
                    **tags, TAG_CLUSTER: self.cluster_name}
        params: dict[str, Any] = dict(spec.node_config)
        # One token per logical launch: botocore's retries of a request whose answer was
        # lost resend it, and EC2 answers them with the same instances, not new ones.
        params.update(MinCount=count, MaxCount=count, ClientToken=uuid.uuid4().hex)
        params.setdefault("KeyName", resources["key_name"])
        if "ImageId" not in params:
            params["ImageId"] = self.default_image(params.get("InstanceType"))
        if "NetworkInterfaces" not in params:
            groups = list(params.get("SecurityGroupIds", []))
            if resources["security_group_id"] not in groups:
                groups.append(resources["security_group_id"])
            params["SecurityGroupIds"] = groups
            if zone and "SubnetId" not in params:
                params["SubnetId"] = resources["subnets"].get(zone) or self._subnet_for_zone(zone)
        params["TagSpecifications"] = _merge_tag_specs(params.get("TagSpecifications", []),
                                                       all_tags)
        if tags.get(TAG_KIND) == "head" and resources.get("head_instance_profile"):
            params.setdefault("IamInstanceProfile", dict(resources["head_instance_profile"]))
        if use_spot:
            market = params.get("InstanceMarketOptions")
            own = market.get("SpotOptions") if isinstance(market, Mapping) else None
            options: dict[str, Any] = {"SpotInstanceType": "one-time",
                                       "InstanceInterruptionBehavior": "terminate",
                                       **(own if isinstance(own, Mapping) else {})}
            if spec.max_price is not None:
                options["MaxPrice"] = str(spec.max_price)
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
        else:
            params.pop("InstanceMarketOptions", None)

        try:
            reply = self._run_instances(params)
        except _sdk_errors() as e:
            code = _error_code(e)
            what = (f"{count}x {params.get('InstanceType', spec.name)} "
                    f"({'spot' if use_spot else 'on-demand'}) in {zone or 'any zone'}")
            if code in CAPACITY_ERROR_CODES:
                raise CapacityError(f"no capacity for {what}: {code}: {_error_message(e)}",
                                    node_type=spec.name, zone=zone, spot=use_spot,
                                    code=code) from e
            raise ProviderError(f"launching {what} failed ({code or type(e).__name__}): "
                                f"{_error_message(e)}") from e
        return [_to_node(inst, fallback_tags=all_tags) for inst in reply["Instances"]]

    def _run_instances(self, params: Mapping[str, Any]) -> Any:
        """run_instances, waiting out a just-created instance profile that EC2 does not
        know yet (IAM is eventually consistent: seconds, sometimes a minute)."""
        deadline = time.monotonic() + PROFILE_PROPAGATION_S
        while True:
            try:
                return self.ec2.run_instances(**params)
            except _sdk_errors() as e:
                unknown_profile = _error_code(e) == "InvalidParameterValue" and \
                    "iaminstanceprofile" in _error_message(e).lower()
                if not (unknown_profile and "IamInstanceProfile" in params) or \
                        time.monotonic() > deadline:
                    raise
                time.sleep(3.0)

    def list_nodes(self, tag_filters: Mapping[str, str] | None = None, *,
                   include_terminated: bool = False) -> list[Node]:
        """This cluster's instances matching every tag; terminated ones only on request."""
        wanted = {**(tag_filters or {}), TAG_CLUSTER: self.cluster_name}
        states = _ALIVE_STATES + (_GONE_STATES if include_terminated else ())
        filters = [{"Name": f"tag:{k}", "Values": [str(v)]} for k, v in wanted.items()]
        filters.append({"Name": "instance-state-name", "Values": list(states)})
        nodes: list[Node] = []
        try:
            for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
                for reservation in page["Reservations"]:
                    nodes += [_to_node(inst) for inst in reservation["Instances"]]
        except _sdk_errors() as e:
            raise ProviderError(f"AWS describe_instances failed: {_error_message(e)}") from e
        return nodes

    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Terminate in batches; ids AWS no longer knows are skipped, not errors."""
        ids = list(dict.fromkeys(node_ids))
        for start in range(0, len(ids), _TERMINATE_BATCH):
            batch = ids[start:start + _TERMINATE_BATCH]
            try:
                self.ec2.terminate_instances(InstanceIds=batch)
            except _sdk_errors() as e:
                if _error_code(e) != "InvalidInstanceID.NotFound":
                    raise ProviderError(
                        f"AWS terminate_instances failed: {_error_message(e)}") from e
                # One unknown id fails the whole call: retry one by one, skipping the gone.
                for node_id in batch:
                    try:
                        self.ec2.terminate_instances(InstanceIds=[node_id])
                    except _sdk_errors() as e1:
                        if _error_code(e1) != "InvalidInstanceID.NotFound":
                            raise ProviderError(f"AWS terminate_instances failed for "
                                                f"{node_id}: {_error_message(e1)}") from e1

    def stop_nodes(self, node_ids: Sequence[str]) -> None:
        """stop_instances (spot instances, which EC2 cannot stop, are terminated)."""
        ids = list(dict.fromkeys(node_ids))
        if not ids:
            return
        spot = {n.id for n in self.list_nodes(include_terminated=True)
                if n.id in ids and n.spot}
        if spot:
            self.terminate_nodes(sorted(spot))
        rest = [i for i in ids if i not in spot]
        if rest:
            self._call("stop_instances", InstanceIds=rest)

    def start_nodes(self, node_ids: Sequence[str], timeout: float = 600.0) -> None:
        """start_instances once they are stopped (not still stopping), then wait for
        running."""
        ids = list(dict.fromkeys(node_ids))
        deadline = time.monotonic() + timeout
        while ids:
            states = {n.id: n.state for n in self.list_nodes() if n.id in ids}
            if not any(s == NodeState.STOPPING for s in states.values()):
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"AWS: {', '.join(ids)} still stopping after {timeout:.0f}s")
            time.sleep(2.0)
        if not ids:
            return
        self._call("start_instances", InstanceIds=ids)
        while True:
            states = {n.id: n.state for n in self.list_nodes(include_terminated=True)
                      if n.id in ids}
            if all(s == NodeState.RUNNING for s in states.values()):
                return
            if any(s == NodeState.TERMINATED for s in states.values()) or \
                    time.monotonic() > deadline:
                raise ProviderError(f"AWS: started {', '.join(ids)} but they are "
                                    f"{', '.join(sorted({s.value for s in states.values()}))}")
            time.sleep(2.0)

    def set_tags(self, node_id: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags on one instance."""
        if tags:
            self._call("create_tags", Resources=[node_id], Tags=_aws_tags(tags))


def _has_permission(existing: Sequence[Mapping[str, Any]], wanted: Mapping[str, Any]) -> bool:
    """Whether an ingress rule equivalent to ``wanted`` is already on the group."""
    for perm in existing:
        if perm.get("IpProtocol") != wanted["IpProtocol"]:
            continue
        if wanted["IpProtocol"] != "-1" and (perm.get("FromPort"), perm.get("ToPort")) != (
                wanted["FromPort"], wanted["ToPort"]):
            continue
        cidrs = {r.get("CidrIp") for r in perm.get("IpRanges", [])}
        groups = {g.get("GroupId") for g in perm.get("UserIdGroupPairs", [])}
        if all(r["CidrIp"] in cidrs for r in wanted.get("IpRanges", [])) and all(
                g["GroupId"] in groups for g in wanted.get("UserIdGroupPairs", [])):
            return True
    return False


def _merge_tag_specs(user_specs: Sequence[Mapping[str, Any]],
                     tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Add strato's tags to instances and volumes, keeping tags the user's config sets."""
    merged: dict[str, dict[str, str]] = {"instance": {}, "volume": {}}
    for user_spec in user_specs:
        rtype = user_spec["ResourceType"]
        merged.setdefault(rtype, {}).update(_tags_dict(user_spec.get("Tags")))
    for rtype in ("instance", "volume"):
        merged[rtype].update(tags)
    return [{"ResourceType": r, "Tags": _aws_tags(t)} for r, t in merged.items()]


def _to_node(inst: Mapping[str, Any], fallback_tags: Mapping[str, str] | None = None) -> Node:
    """EC2 instance description -> Node (spot from InstanceLifecycle, preempted from reason)."""
    reason = inst.get("StateReason") or {}
    preempted = (reason.get("Code") == SPOT_TERMINATION_CODE
                 or SPOT_TERMINATION_CODE in (reason.get("Message") or ""))
    launch = inst.get("LaunchTime")
    tags = _tags_dict(inst.get("Tags")) or dict(fallback_tags or {})
    return Node(
        id=inst["InstanceId"],
        state=_STATE_MAP.get(inst.get("State", {}).get("Name", ""), NodeState.PENDING),
        tags=tags,
        private_ip=inst.get("PrivateIpAddress") or None,
        public_ip=inst.get("PublicIpAddress") or None,
        spot=inst.get("InstanceLifecycle") == "spot",
        preempted=preempted,
        zone=(inst.get("Placement") or {}).get("AvailabilityZone"),
        instance_type=inst.get("InstanceType"),
        launch_time=launch.timestamp() if hasattr(launch, "timestamp") else None,
    )


PROVIDER = AWSProvider
