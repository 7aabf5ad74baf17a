"""``GCPProvider``: nodes on Compute Engine, found again by their labels.

The class itself holds the provider's state, its config checks, the catalogue and the
resources a node offers; creating instances is ``launch.py``, everything after that
``instances.py``, the API plumbing ``api.py``, names and machine shapes ``names.py``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from strato.exceptions import ConfigError
from strato.providers.base import (
    ConfigProblem,
    NodeProvider,
    NodeTypeSpec,
    SpotIdiom,
    config_sections,
)
from strato.providers.gcp.api import (
    Failure,
    GCPClients,
    make_clients,
    operation_failure,
    wait_operation,
)
from strato.providers.gcp.instances import InstancesMixin
from strato.providers.gcp.launch import DEFAULT_NETWORK, LaunchMixin
from strato.providers.gcp.names import (
    ACCELERATOR_NAMES,
    LABEL_NAME_RE,
    accelerator_name,
    cluster_prefix,
    machine_shape,
    short,
)

# Share of the machine's memory advertised as the ``memory`` resource (as on AWS).
MEMORY_FRACTION = 0.7


class GCPProvider(LaunchMixin, InstancesMixin, NodeProvider):
    """Nodes on Compute Engine, found again by their labels (never by local memory).

    provider_config: ``project_id`` (required), ``availability_zone`` (default zone),
    ``api_endpoint``, ``credentials_file``, ``network`` (default
    ``global/networks/default``), ``subnetwork``, ``image`` / ``gpu_image`` (default boot
    images), ``ssh_user`` + ``ssh_public_key`` (key for nodes created before or without
    ``prepare``), ``operation_timeout_s``, ``preemption_lookback_s``.
    """

    needs_prepare_to_reach_nodes = True
    default_ssh_user = "ubuntu"
    can_stop_nodes = True

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[ConfigProblem]:
        """project_id, a zone for every node type, and names that fit in labels."""
        provider, types = config_sections(config)
        problems = []
        if not provider.get("project_id"):
            problems.append(ConfigProblem(("provider", "project_id"),
                                          "required for provider type 'gcp'"))
        if not provider.get("availability_zone"):
            for name, nt in types.items():
                if isinstance(nt, Mapping) and not nt.get("zones"):
                    problems.append(ConfigProblem(
                        ("available_node_types", name, "zones"),
                        "provider type 'gcp' needs provider.availability_zone or zones on "
                        "every node type"))
        name = config.get("cluster_name")
        if isinstance(name, str) and not LABEL_NAME_RE.match(name):
            problems.append(ConfigProblem(("cluster_name",), "on gcp must be lower-case "
                                          "letters, digits, '-' or '_' (it is stored in "
                                          "labels)"))
        for name in types:
            if isinstance(name, str) and not LABEL_NAME_RE.match(name):
                problems.append(ConfigProblem(
                    ("available_node_types", name), "node type names on gcp must be "
                    "lower-case letters, digits, '-' or '_' (they are stored in labels)"))
        return problems

    @classmethod
    def spot_idiom(cls, node_config: Mapping[str, Any]) -> SpotIdiom | None:
        """``scheduling: {provisioningModel: SPOT}`` or ``{preemptible: true}`` (Ray's
        examples write ``scheduling`` as a list of one mapping; both forms count)."""
        raw = node_config.get("scheduling")
        parts = [(None, raw)] if isinstance(raw, Mapping) else \
            list(enumerate(raw)) if isinstance(raw, list) else []
        for index, part in parts:
            if not isinstance(part, Mapping):
                continue
            where: tuple[str | int, ...] = ("scheduling",) if index is None else \
                ("scheduling", index)
            if str(part.get("provisioningModel", "")).upper() == "SPOT":
                return SpotIdiom((*where, "provisioningModel"),
                                 "scheduling.provisioningModel: SPOT")
            if part.get("preemptible") is True:
                return SpotIdiom((*where, "preemptible"), "scheduling.preemptible: true")
        return None

    @property
    def spot_notice(self) -> str | None:
        return "gcp"  # instance/preempted in the metadata server

    def __init__(self, provider_config: Mapping[str, Any], cluster_name: str, *,
                 clients: GCPClients | None = None):
        super().__init__(provider_config, cluster_name)
        if not self.provider_config.get("project_id"):
            raise ConfigError("provider.project_id is required for provider type gcp")
        self.project: str = self.provider_config["project_id"]
        self.default_zone: str | None = self.provider_config.get("availability_zone")
        self.network: str = self.provider_config.get("network") or DEFAULT_NETWORK
        self.prefix = cluster_prefix(cluster_name)
        self.network_tag = self.prefix
        # Our instance names; recognises this cluster's preempted-and-deleted instances
        # even in a fresh process (kinds have no "-", so "demo" never matches "demo-2").
        self._name_re = re.compile(rf"{re.escape(self.prefix)}-([a-z0-9]+)-[0-9a-f]{{6}}")
        self._clients = clients
        self._zones: dict[str, str] = {}             # instance name -> zone
        self._last_tags: dict[str, dict[str, str]] = {}  # for preempted-and-deleted nodes
        self._deleted: set[str] = set()              # terminated by us: never "preempted"
        self._ssh_entry: str | None = None
        user, pub = self.provider_config.get("ssh_user"), self.provider_config.get(
            "ssh_public_key")
        if user and pub:
            self._ssh_entry = f"{user}:{pub.strip()}"

    @property
    def clients(self) -> GCPClients:
        if self._clients is None:
            self._clients = make_clients(self.provider_config)
        return self._clients

    # -------------------------------------------------------------- operations
    def _wait(self, operation: Any, zone: str | None) -> Any:
        """Wait for a zone (or global) operation to be DONE (``operation_timeout_s``)."""
        return wait_operation(self.clients, self.project, operation, zone,
                              float(self.provider_config.get("operation_timeout_s", 900)))

    @staticmethod
    def _operation_failure(operation: Any) -> Failure | None:
        return operation_failure(operation)

    # -------------------------------------------------------------- catalogue
    catalog_cloud = "gcp"

    def catalog_region(self, zone: str | None = None) -> str | None:
        """GCP regions are zones without their last ``-x``."""
        zone = zone or self.default_zone
        return zone.rsplit("-", 1)[0] if zone else self.provider_config.get("region")

    def instance_type_of(self, spec: NodeTypeSpec) -> str | None:
        return short(spec.node_config.get("machineType") or "") or None

    def accelerators_of(self, spec: NodeTypeSpec) -> tuple[str, int] | None:
        accs = spec.node_config.get("guestAccelerators") or []
        if not accs:
            return None
        return (accelerator_name(accs[0].get("acceleratorType") or ""),
                sum(int(a.get("acceleratorCount", 1)) for a in accs))

    def with_instance_type(self, spec: NodeTypeSpec, instance_type: str,
                           accelerator: str | None = None,
                           accelerator_count: int = 0) -> NodeTypeSpec:
        """``machineType``; GPUs a machine type does not carry (n1 + T4) are attached as
        ``guestAccelerators``."""
        config = {**spec.node_config, "machineType": instance_type}
        config.pop("guestAccelerators", None)
        if accelerator and accelerator_count and machine_shape(instance_type)[2] == 0:
            gce = next((k for k, v in ACCELERATOR_NAMES.items() if v == accelerator),
                       f"nvidia-{accelerator.lower()}")
            config["guestAccelerators"] = [{"acceleratorType": gce,
                                            "acceleratorCount": accelerator_count}]
        return dataclasses.replace(spec, node_config=config)

    # -------------------------------------------------------------- resources
    def runtime_resources(self, spec: NodeTypeSpec) -> dict[str, float]:
        """CPU, GPU, memory and accelerator_type from machine type and guestAccelerators."""
        found: dict[str, float] = {}
        machine_type = spec.node_config.get("machineType") or ""
        cpus, gib, gpus, acc_type = machine_shape(machine_type) if machine_type else (
            None, None, 0, None)
        if cpus:
            found["CPU"] = cpus
        if gib:
            found["memory"] = float(int(gib * 2**30 * MEMORY_FRACTION))
        for acc in spec.node_config.get("guestAccelerators") or []:
            gpus += int(acc.get("acceleratorCount", 1))
            acc_type = acc_type or acc.get("acceleratorType")
        if gpus:
            found["GPU"] = float(gpus)
            if acc_type:
                found[f"accelerator_type:{accelerator_name(acc_type)}"] = 1.0
        found.update(spec.resources)
        return found
