"""EC2 instances of a cluster: launching them (spot or on-demand, capacity errors read
as ``CapacityError``), listing, terminating, stopping and starting, tags. Mixed into
``AWSProvider`` (``provider.py``).

Spot instances cannot be stopped on EC2 (strato asks for one-time spot requests that
terminate on interruption): ``stop_nodes`` terminates them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from strato.exceptions import CapacityError, ProviderError
from strato.providers.aws.api import (
    as_list,
    aws_tags,
    error_code,
    error_message,
    sdk_errors,
    tags_dict,
)
from strato.providers.aws.iam import PROFILE_PROPAGATION_S
from strato.providers.base import TAG_CLUSTER, TAG_KIND, TAG_NAME, Node, NodeState, NodeTypeSpec

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

_TERMINATE_BATCH = 1000  # TerminateInstances limit per call


class InstancesMixin:
    """``create_nodes``, ``list_nodes``, ``terminate_nodes``, ``stop_nodes``,
    ``start_nodes`` and ``set_tags`` of ``AWSProvider``."""

    # kept by AWSProvider (its __init__ says what each is), as are ``ec2``, ``_call``
    # and ``resource_name``
    provider_config: dict[str, Any]
    cluster_name: str

    # ------------------------------------------------------------------ nodes
    def create_nodes(self, spec: NodeTypeSpec, count: int, tags: Mapping[str, str], *,
                     zone: str | None = None, spot: bool | None = None) -> list[Node]:
        """run_instances for ``count`` nodes; capacity failures raise ``CapacityError``."""
        if count <= 0:
            return []
        use_spot = spec.spot if spot is None else spot
        zone = zone or (list(spec.zones) or as_list(
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
        except sdk_errors() as e:
            code = error_code(e)
            what = (f"{count}x {params.get('InstanceType', spec.name)} "
                    f"({'spot' if use_spot else 'on-demand'}) in {zone or 'any zone'}")
            if code in CAPACITY_ERROR_CODES:
                raise CapacityError(f"no capacity for {what}: {code}: {error_message(e)}",
                                    node_type=spec.name, zone=zone, spot=use_spot,
                                    code=code) from e
            raise ProviderError(f"launching {what} failed ({code or type(e).__name__}): "
                                f"{error_message(e)}") from e
        return [_to_node(inst, fallback_tags=all_tags) for inst in reply["Instances"]]

    def _run_instances(self, params: Mapping[str, Any]) -> Any:
        """run_instances, waiting out a just-created instance profile that EC2 does not
        know yet (IAM is eventually consistent: seconds, sometimes a minute)."""
        deadline = time.monotonic() + PROFILE_PROPAGATION_S
        while True:
            try:
                return self.ec2.run_instances(**params)
            except sdk_errors() as e:
                unknown_profile = error_code(e) == "InvalidParameterValue" and \
                    "iaminstanceprofile" in error_message(e).lower()
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
        except sdk_errors() as e:
            raise ProviderError(f"AWS describe_instances failed: {error_message(e)}") from e
        return nodes

    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Terminate in batches; ids AWS no longer knows are skipped, not errors."""
        ids = list(dict.fromkeys(node_ids))
        for start in range(0, len(ids), _TERMINATE_BATCH):
            batch = ids[start:start + _TERMINATE_BATCH]
            try:
                self.ec2.terminate_instances(InstanceIds=batch)
            except sdk_errors() as e:
                if error_code(e) != "InvalidInstanceID.NotFound":
                    raise ProviderError(
                        f"AWS terminate_instances failed: {error_message(e)}") from e
                # One unknown id fails the whole call: retry one by one, skipping the gone.
                for node_id in batch:
                    try:
                        self.ec2.terminate_instances(InstanceIds=[node_id])
                    except sdk_errors() as e1:
                        if error_code(e1) != "InvalidInstanceID.NotFound":
                            raise ProviderError(f"AWS terminate_instances failed for "
                                                f"{node_id}: {error_message(e1)}") from e1

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
            self._call("create_tags", Resources=[node_id], Tags=aws_tags(tags))


def _merge_tag_specs(user_specs: Sequence[Mapping[str, Any]],
                     tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Add strato's tags to instances and volumes, keeping tags the user's config sets."""
    merged: dict[str, dict[str, str]] = {"instance": {}, "volume": {}}
    for user_spec in user_specs:
        rtype = user_spec["ResourceType"]
        merged.setdefault(rtype, {}).update(tags_dict(user_spec.get("Tags")))
    for rtype in ("instance", "volume"):
        merged[rtype].update(tags)
    return [{"ResourceType": r, "Tags": aws_tags(t)} for r, t in merged.items()]


def _to_node(inst: Mapping[str, Any], fallback_tags: Mapping[str, str] | None = None) -> Node:
    """EC2 instance description -> Node (spot from InstanceLifecycle, preempted from reason)."""
    reason = inst.get("StateReason") or {}
    preempted = (reason.get("Code") == SPOT_TERMINATION_CODE
                 or SPOT_TERMINATION_CODE in (reason.get("Message") or ""))
    launch = inst.get("LaunchTime")
    tags = tags_dict(inst.get("Tags")) or dict(fallback_tags or {})
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

