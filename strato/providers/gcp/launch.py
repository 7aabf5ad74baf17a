"""Making GCE instances: what a VM needs before it exists and the inserts themselves.

``prepare`` picks the SSH key (GCE's guest agent lets in only keys from the VM's own or
the project's ``ssh-keys`` metadata, so every VM strato creates carries it) and ensures
the SSH and intra-cluster firewall rules. The insert body adds to ``node_config`` the
zone-qualified types, a default boot disk, the network and its tag, spot scheduling,
labels, the ``ssh-keys`` metadata and, on the head, the service account its monitor calls
Compute with. Mixed into ``GCPProvider`` (``provider.py``), which holds the state.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strato.exceptions import CapacityError, ConfigError, ProviderError
from strato.localfiles import strato_home
from strato.providers.base import TAG_CLUSTER, TAG_KIND, TAG_NAME, Node, NodeTypeSpec
from strato.providers.gcp.api import Failure, api_errors, http_error_text
from strato.providers.gcp.names import (
    label_key,
    label_value,
    machine_shape,
    merged_scheduling,
    resource_name,
)
from strato.providers.keys import ensure_key_pair, public_key_from_private

COMPUTE_URL = "https://www.googleapis.com/compute/v1/"
DEFAULT_NETWORK = "global/networks/default"
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
DEFAULT_IMAGE = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"
# Deep Learning VM image: NVIDIA driver, CUDA and docker preinstalled.
DEFAULT_GPU_IMAGE = ("projects/deeplearning-platform-release/global/images/family/"
                     "common-cu124-ubuntu-2204-py310")
DEFAULT_DISK_GB = 100


class LaunchMixin:
    """``prepare``, ``adopt_facts`` and ``create_nodes`` of ``GCPProvider``."""

    # kept by GCPProvider (its __init__ says what each is), as are ``clients``,
    # ``_wait``, ``_operation_failure`` and ``_node``
    provider_config: dict[str, Any]
    cluster_name: str
    project: str
    default_zone: str | None
    network: str
    prefix: str
    network_tag: str
    _zones: dict[str, str]
    _ssh_entry: str | None

    # -------------------------------------------------------------- prepare
    def adopt_facts(self, facts: Mapping[str, Any]) -> None:
        """Take the SSH key ``prepare`` chose (maybe in another process: the monitor)."""
        user, public = facts.get("ssh_user"), facts.get("ssh_public_key")
        if user and public:
            self._ssh_entry = f"{user}:{str(public).strip()}"

    def prepare(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """Ensure the SSH and intra-cluster firewall rules exist and pick the SSH key."""
        auth = dict(config.get("auth") or {})
        user = auth.get("ssh_user") or self.provider_config.get("ssh_user") or "strato"
        if auth.get("ssh_private_key"):
            key_path = Path(auth["ssh_private_key"]).expanduser()
            if auth.get("ssh_public_key"):
                public = Path(auth["ssh_public_key"]).expanduser().read_text().strip()
            else:
                public = public_key_from_private(key_path)
        else:
            key_path = strato_home() / "keys" / f"{self.prefix}-gcp"
            public = ensure_key_pair(key_path)
        self._ssh_entry = f"{user}:{public}"

        ssh_rule = resource_name(f"{self.prefix}-ssh")
        internal_rule = resource_name(f"{self.prefix}-internal")
        self._ensure_firewall({
            "name": ssh_rule, "network": self.network, "direction": "INGRESS",
            "description": f"strato cluster {self.cluster_name}: SSH from anywhere",
            "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
            "sourceRanges": ["0.0.0.0/0"], "targetTags": [self.network_tag],
        })
        self._ensure_firewall({
            "name": internal_rule, "network": self.network, "direction": "INGRESS",
            "description": f"strato cluster {self.cluster_name}: traffic between its nodes",
            "allowed": [{"IPProtocol": "all"}],
            "sourceTags": [self.network_tag], "targetTags": [self.network_tag],
        })
        return {"ssh_user": user, "private_key_path": str(key_path), "ssh_public_key": public,
                "network_tag": self.network_tag, "firewall_rules": [ssh_rule, internal_rule]}

    def _ensure_firewall(self, body: Mapping[str, Any]) -> None:
        errors = api_errors()
        try:
            self.clients.firewalls.get(project=self.project, firewall=body["name"])
            return
        except errors.NotFound:
            pass
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE firewall {body['name']}: {http_error_text(e)}") from e
        resource = self.clients.compute.Firewall.from_json(json.dumps(body))
        try:
            op = self.clients.firewalls.insert_unary(project=self.project,
                                                     firewall_resource=resource)
        except errors.Conflict:
            return  # created meanwhile by another strato process
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE firewall {body['name']}: {http_error_text(e)}") from e
        failure = self._operation_failure(self._wait(op, None))
        if failure and "ALREADY_EXISTS" not in failure.code:
            raise ProviderError(f"GCE firewall {body['name']}: {failure.message}")

    # -------------------------------------------------------------- create
    def _zone_for(self, spec: NodeTypeSpec, zone: str | None) -> str:
        chosen = zone or (spec.zones[0] if spec.zones else None) or self.default_zone
        if not chosen:
            raise ConfigError(f"available_node_types.{spec.name}: no zone; set zones or "
                              "provider.availability_zone")
        return chosen

    def _labels(self, tags: Mapping[str, str]) -> dict[str, str]:
        labels = {label_key(k): label_value(v) for k, v in tags.items() if k != TAG_NAME}
        labels[TAG_CLUSTER] = label_value(self.cluster_name)
        return labels

    def _zonal(self, zone: str, collection: str, value: str) -> str:
        return value if "/" in value else f"zones/{zone}/{collection}/{value}"

    def instance_body(self, spec: NodeTypeSpec, name: str, zone: str,
                      tags: Mapping[str, str], spot: bool) -> dict[str, Any]:
        """The instances.insert body (REST JSON): node_config plus what strato adds."""
        body = copy.deepcopy(dict(spec.node_config))
        where = f"available_node_types.{spec.name}.node_config"
        if not body.get("machineType"):
            raise ConfigError(f"{where}.machineType is required (e.g. n1-standard-4)")
        body["name"] = name
        body["machineType"] = self._zonal(zone, "machineTypes", body["machineType"])

        accelerators = body.get("guestAccelerators") or []
        for acc in accelerators:
            acc_type = acc.get("acceleratorType") or ""
            if not acc_type:
                raise ConfigError(f"{where}.guestAccelerators: acceleratorType is required")
            if "/" not in acc_type:
                acc["acceleratorType"] = (f"{COMPUTE_URL}projects/{self.project}/zones/{zone}/"
                                          f"acceleratorTypes/{acc_type}")
            acc.setdefault("acceleratorCount", 1)
        has_gpu = bool(accelerators) or machine_shape(body["machineType"])[2] > 0

        if not body.get("disks"):
            image = (self.provider_config.get("gpu_image") or DEFAULT_GPU_IMAGE) if has_gpu \
                else (self.provider_config.get("image") or DEFAULT_IMAGE)
            body["disks"] = [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                              "initializeParams": {"sourceImage": image,
                                                   "diskSizeGb": str(DEFAULT_DISK_GB)}}]
        for disk in body["disks"]:
            params = disk.get("initializeParams") or {}
            if params.get("diskType"):
                params["diskType"] = self._zonal(zone, "diskTypes", params["diskType"])

        nics = body.get("networkInterfaces") or [
            {"accessConfigs": [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]}]
        for nic in nics:
            nic.setdefault("network", self.network)
            if self.provider_config.get("subnetwork"):
                nic.setdefault("subnetwork", self.provider_config["subnetwork"])
        body["networkInterfaces"] = nics

        scheduling = merged_scheduling(body.get("scheduling"))
        if has_gpu:
            scheduling.setdefault("onHostMaintenance", "TERMINATE")
        if spot:
            scheduling["provisioningModel"] = "SPOT"
            scheduling.setdefault("instanceTerminationAction", "DELETE")
            scheduling["onHostMaintenance"] = "TERMINATE"
            scheduling["automaticRestart"] = False
        else:  # on-demand fallback of a spot node type: drop every spot setting
            if scheduling.get("provisioningModel") == "SPOT":
                scheduling["provisioningModel"] = "STANDARD"
            scheduling.pop("instanceTerminationAction", None)
            scheduling.pop("preemptible", None)
        body["scheduling"] = scheduling

        user_labels = {label_key(k): label_value(v)
                       for k, v in (body.get("labels") or {}).items()}
        body["labels"] = {**user_labels, **self._labels(tags)}

        net_tags = dict(body.get("tags") or {})
        items = list(net_tags.get("items") or [])
        if self.network_tag not in items:
            items.append(self.network_tag)
        body["tags"] = {**net_tags, "items": items}

        if tags.get(TAG_KIND) == "head" and not body.get("serviceAccounts") and \
                self.provider_config.get("head_credentials"):
            # the monitor on the head calls Compute with the VM's own service account
            body["serviceAccounts"] = [{
                "email": self.provider_config.get("service_account") or "default",
                "scopes": [COMPUTE_SCOPE]}]

        if self._ssh_entry:
            metadata = dict(body.get("metadata") or {})
            md_items = [dict(i) for i in metadata.get("items") or []]
            for item in md_items:
                if item.get("key") == "ssh-keys":
                    if self._ssh_entry not in item.get("value", ""):
                        item["value"] = f"{item.get('value', '').rstrip()}\n{self._ssh_entry}"
                    break
            else:
                md_items.append({"key": "ssh-keys", "value": self._ssh_entry})
            body["metadata"] = {**metadata, "items": md_items}
        return body

    def create_nodes(self, spec: NodeTypeSpec, count: int, tags: Mapping[str, str], *,
                     zone: str | None = None, spot: bool | None = None) -> list[Node]:
        """Insert ``count`` instances, wait for their operations, return them as Nodes.

        Instances that were created stay (they carry the cluster label, so the next
        ``list_nodes`` sees them) even when another insert fails and this raises.
        """
        if count <= 0:
            return []
        if not self._ssh_entry:
            # GCE lets in only keys from the instance's or the project's ssh-keys metadata:
            # a VM created without ours could never be set up (it would hang in SSH).
            raise ProviderError(
                f"GCE: no SSH key for new {spec.name} instances of cluster "
                f"{self.cluster_name!r}: run prepare() (strato up) or hand its facts over "
                "(adopt_facts), or set provider.ssh_user and provider.ssh_public_key")
        errors = api_errors()
        zone = self._zone_for(spec, zone)
        spot = spec.spot if spot is None else spot
        kind = re.sub(r"[^a-z0-9]", "", str(tags.get(TAG_KIND) or "").lower())[:10] or "node"
        bodies = []
        for _ in range(count):
            name = f"{self.prefix}-{kind}-{secrets.token_hex(3)}"
            body = self.instance_body(spec, name, zone, tags, spot)
            try:
                resource = self.clients.compute.Instance.from_json(json.dumps(body))
            except Exception as e:  # json_format.ParseError: an unknown or mistyped field
                raise ConfigError(f"available_node_types.{spec.name}.node_config: {e}") from e
            bodies.append((name, resource))

        started: list[tuple[str, Any]] = []
        failures: list[Failure] = []
        for name, resource in bodies:
            try:
                # requestId: a retried insert whose answer was lost returns the same
                # operation instead of failing or creating another instance
                op = self.clients.instances.insert_unary(
                    request={"project": self.project, "zone": zone,
                             "instance_resource": resource, "request_id": str(uuid.uuid4())})
            except errors.GoogleAPICallError as e:
                failures.append(Failure(code=str(e.code), message=http_error_text(e)))
                break  # the rest would fail the same way
            started.append((name, op))

        created: list[str] = []
        for name, op in started:
            try:
                failure = self._operation_failure(self._wait(op, zone))
            except errors.GoogleAPICallError as e:
                failure = Failure(code=str(e.code), message=http_error_text(e))
            if failure:
                failures.append(failure)
            else:
                self._zones[name] = zone
                created.append(name)
        nodes = [self._node(self.clients.instances.get(
            project=self.project, zone=zone, instance=name)) for name in created]
        if failures:
            self._raise_create_failure(spec, zone, spot, failures, created, count)
        return nodes

    def _raise_create_failure(self, spec: NodeTypeSpec, zone: str, spot: bool,
                              failures: list[Failure], created: list[str], count: int) -> None:
        made = f" ({len(created)} of {count} created: {', '.join(created)})" if created else ""
        where = f"{spec.name} ({'spot' if spot else 'on-demand'}) in {zone}"
        for failure in failures:
            code = failure.capacity
            if code:
                raise CapacityError(f"GCE has no capacity for {where}: {failure.message}{made}",
                                    node_type=spec.name, zone=zone, spot=spot, code=code)
        first = failures[0]
        raise ProviderError(f"GCE could not create {where}: [{first.code}] "
                            f"{first.message}{made}")
