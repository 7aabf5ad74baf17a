"""What an AWS cluster needs before its first instance: the key pair (made, or imported
from ``auth.ssh_private_key``; never another owner's replaced), the security group (SSH
in, all traffic within), the default VPC and a subnet per zone. Mixed into
``AWSProvider`` (``provider.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strato.exceptions import ConfigError, ProviderError
from strato.localfiles import strato_home, write_secret
from strato.providers.aws.api import as_list, aws_tags, error_code, error_message, sdk_errors
from strato.providers.base import TAG_CLUSTER, TAG_OWNER
from strato.providers.keys import public_key_from_private


def _key_body(public_key: str) -> str:
    """``type base64`` of a public key line, without the comment, for comparison."""
    return " ".join(public_key.split()[:2])


def _key_digest(public_key: str) -> str:
    """A short digest naming a key pair after its key."""
    return hashlib.sha256(_key_body(public_key).encode()).hexdigest()[:12]


class SetupMixin:
    """``prepare``, ``adopt_facts`` and the launch resources of ``AWSProvider``."""

    # kept by AWSProvider (its __init__ says what each is), as are ``ec2``, ``_call``
    # and ``resource_name``
    provider_config: dict[str, Any]
    cluster_name: str
    _prepared: dict[str, Any] | None
    _subnets: dict[str, str]
    _vpc_id: str | None

    # ------------------------------------------------------------------ prepare
    def prepare(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """Ensure key pair, security group and per-zone subnets exist; safe to repeat."""
        auth = dict(config.get("auth") or {})
        key_name, key_path = self._ensure_key_pair(auth)
        vpc_id = self._default_vpc()
        group_id = self._ensure_security_group(vpc_id)
        zones: list[str] = []
        for node_type in (config.get("available_node_types") or {}).values():
            zones += as_list((node_type or {}).get("zones"))
        zones += as_list(self.provider_config.get("availability_zone"))
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
                                               "Tags": aws_tags(self._resource_tags())}])
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
                                                 "Tags": aws_tags(self._resource_tags())}])
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
        except sdk_errors() as e:
            if error_code(e) == "InvalidKeyPair.NotFound":
                return None
            raise ProviderError(f"AWS describe_key_pairs failed: {error_message(e)}") from e
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
                TagSpecifications=[{"ResourceType": "security-group", "Tags": aws_tags(
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
            except sdk_errors() as e:
                if error_code(e) != "InvalidPermission.Duplicate":
                    raise ProviderError(
                        f"AWS authorize_security_group_ingress failed: {error_message(e)}"
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

