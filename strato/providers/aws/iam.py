"""The head's credentials on AWS: the monitor beside the head launches, tags, stops and
terminates instances with the head's own IAM role, never the laptop's keys.

``prepare`` creates (when absent) a role ``strato-head-<cluster>`` that only EC2 may
assume, with an inline policy of exactly the EC2 calls the monitor makes (state-changing
ones limited to instances tagged with this cluster), and an instance profile of the same
name; the head is launched with it (``IamInstanceProfile``). Workers get none: they never
call AWS. ``provider.iam_instance_profile`` names an existing profile to use instead;
``provider.head_credentials`` (set by the launcher: true where the monitor runs on the
head) must be true for any of this. Mixed into ``AWSProvider`` (``provider.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from strato.exceptions import ProviderError
from strato.providers.aws.api import error_code, error_message, make_iam_client, sdk_errors
from strato.providers.base import TAG_CLUSTER

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


class HeadRoleMixin:
    """The head's role and instance profile, for ``AWSProvider.prepare``."""

    # kept by AWSProvider (its __init__ says what each is), as are ``ec2``, ``_call``
    # and ``resource_name``
    provider_config: dict[str, Any]
    cluster_name: str

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
        except sdk_errors() as e:
            raise ProviderError(
                f"AWS IAM {error_code(e) or type(e).__name__}: could not set up the head's "
                f"role and instance profile {head_role_name(self.cluster_name)!r} (the "
                f"monitor on the head needs them to launch workers and autostop): "
                f"{error_message(e)}. Set provider.iam_instance_profile to an existing "
                "profile, or provider.monitor: local") from e

    def _ensure_head_role(self) -> str:
        """Role + inline policy + instance profile, each created when absent; its ARN."""
        iam = make_iam_client(self.provider_config)
        name = head_role_name(self.cluster_name)
        tags = [{"Key": TAG_CLUSTER, "Value": self.cluster_name}]
        try:
            iam.get_role(RoleName=name)
        except sdk_errors() as e:
            if error_code(e) != "NoSuchEntity":
                raise
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(_EC2_TRUST),
                            Description=f"strato: the head of cluster {self.cluster_name} "
                                        "(its monitor's EC2 calls)", Tags=tags)
        # kept current: a newer strato may call one more action
        iam.put_role_policy(RoleName=name, PolicyName="strato-monitor",
                            PolicyDocument=json.dumps(head_policy(self.cluster_name)))
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except sdk_errors() as e:
            if error_code(e) != "NoSuchEntity":
                raise
            profile = iam.create_instance_profile(InstanceProfileName=name,
                                                  Tags=tags)["InstanceProfile"]
        if name not in {r.get("RoleName") for r in profile.get("Roles", [])}:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        return str(profile["Arn"])
