"""Google Compute Engine node provider: firewall rules, on-demand and spot instances.

``google.cloud.compute_v1`` is imported only inside ``make_clients`` so users of other
clouds never need it. Every API call goes through the clients that factory builds; with
``provider.api_endpoint`` set they talk REST to that endpoint (anonymous credentials
unless ``credentials_file`` is given), which is how tests point them at a local fake.
Operations are polled with our own operations clients: ``operation.result()`` builds
an internal client that ignores the endpoint.

Tags become GCE *labels*: keys and values are lower-cased and reduced to ``[a-z0-9_-]``
(at most 63 characters), so values read back are the sanitized form. ``TAG_NAME`` is not
a label; the instance name (``strato-<cluster>-<kind>-<6 hex>``) plays its part and is
reported as ``Node.tags[TAG_NAME]``. ``Node.id`` is the instance name; instances are
listed across all zones with one aggregated call, so nodes in any zone are found by a
fresh process too.

The head's credentials: the head VM is created with a service account and the compute
scope (``serviceAccounts``), so the monitor beside it calls Compute as that account:
``provider.service_account`` (an email) if set, else the project's default compute
service account. Creating a dedicated account needs the IAM API, which strato does not
call. Only with ``provider.head_credentials`` (set by the launcher: true where the
monitor runs on the head).

Stopping (autostop with ``down: false``): on-demand instances are stopped
(``instances.stop``: ``STOPPING``, then ``TERMINATED``, GCE's word for a stopped VM that
keeps its disk, metadata and internal IP; its ephemeral external IP is released) and
started again by the next ``up`` (``instances.start``, only once they are
``TERMINATED``: GCE refuses to start a VM still ``STOPPING``). Spot instances are deleted
instead, as on AWS: strato creates them with ``instanceTerminationAction: DELETE``, and a
stopped spot VM would start again only when spot capacity allows. Stopped instances are
listed like running ones (so ``down`` and ``status`` see them); preempted ones only with
``include_terminated``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from strato.exceptions import CapacityError, ConfigError, ProviderError
from strato.localfiles import strato_home
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    TAG_NAME,
    ConfigProblem,
    Node,
    NodeProvider,
    NodeState,
    NodeTypeSpec,
    SpotIdiom,
    config_sections,
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
PREEMPTED_OPERATION = "compute.instances.preempted"

# Share of the machine's memory advertised as the ``memory`` resource (as on AWS).
MEMORY_FRACTION = 0.7

# Words in an operation or HTTP error that all mean "no capacity for this request here";
# the autoscaler treats them alike (next zone, then on-demand). Checked in order.
CAPACITY_MARKERS: tuple[tuple[str, str], ...] = (
    ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"),
    ("ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED"),
    ("QUOTA_EXCEEDED", "QUOTA_EXCEEDED"),
    ("quotaExceeded", "QUOTA_EXCEEDED"),
    ("STOCKOUT", "STOCKOUT"),
    ("resource pool", "ZONE_RESOURCE_POOL_EXHAUSTED"),
    ("does not have enough resources", "ZONE_RESOURCE_POOL_EXHAUSTED"),
    # The zone does not offer the machine or accelerator type (AWS: "Unsupported").
    ("does not exist in zone", "UNSUPPORTED_IN_ZONE"),
)

_STATE_MAP = {
    "PROVISIONING": NodeState.PENDING,
    "STAGING": NodeState.PENDING,
    "RUNNING": NodeState.RUNNING,
    "REPAIRING": NodeState.RUNNING,
    "STOPPING": NodeState.STOPPING,
    "SUSPENDING": NodeState.STOPPING,
    "TERMINATED": NodeState.STOPPED,  # GCE's TERMINATED is a stopped VM that still exists
    "SUSPENDED": NodeState.STOPPED,
}

# Statuses ``instances.stop`` is called for (TERMINATED is stopped already; a STOPPING
# VM is on its way, and GCE refuses to stop it again), those ``start`` waits out, and how
# often it looks.
_STOPPABLE = ("PROVISIONING", "STAGING", "RUNNING", "REPAIRING")
_SETTLING = ("STOPPING", "SUSPENDING")
_POLL_S = 1.0

# GCE accelerator type -> the name used in ``accelerator_type:<NAME>`` resources.
ACCELERATOR_NAMES = {
    "nvidia-tesla-k80": "K80",
    "nvidia-tesla-p4": "P4",
    "nvidia-tesla-p100": "P100",
    "nvidia-tesla-v100": "V100",
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-a100": "A100",
    "nvidia-a100-80gb": "A100-80G",
    "nvidia-l4": "L4",
    "nvidia-h100-80gb": "H100",
    "nvidia-h100-mega-80gb": "H100",
    "nvidia-h200-141gb": "H200",
    "nvidia-b200": "B200",
}

# Accelerator-optimized families carry their GPUs in the machine type itself:
# family -> (accelerator type, vCPUs per GPU, GiB per GPU).
_GPU_FAMILIES = {
    "a2-highgpu": ("nvidia-tesla-a100", 12, 85),
    "a2-megagpu": ("nvidia-tesla-a100", 6, 85),
    "a2-ultragpu": ("nvidia-a100-80gb", 12, 170),
    "a3-highgpu": ("nvidia-h100-80gb", 26, 234),
    "a3-megagpu": ("nvidia-h100-mega-80gb", 26, 234),
    "a3-edgegpu": ("nvidia-h100-80gb", 26, 234),
    "a3-ultragpu": ("nvidia-h200-141gb", 28, 368),
}
# g2-standard-<vCPUs>: one L4 up to 16 vCPUs, then these.
_G2_GPUS = {24: 2, 32: 1, 48: 4, 96: 8}
# GiB per vCPU by (series, class); n1 differs from the newer series.
_GIB_PER_VCPU = {
    ("n1", "standard"): 3.75, ("n1", "highmem"): 6.5, ("n1", "highcpu"): 0.9,
    ("standard",): 4.0, ("highmem",): 8.0, ("highcpu",): 1.0,
}
_SHARED_CORE = {"e2-micro": (2, 1), "e2-small": (2, 2), "e2-medium": (2, 4),
                "f1-micro": (1, 0.6), "g1-small": (1, 1.7)}


# ------------------------------------------------------------------ clients
@dataclass
class GCPClients:
    """The Compute API clients one provider uses, plus the ``compute_v1`` module for types."""

    compute: Any
    instances: Any
    zone_operations: Any
    global_operations: Any
    firewalls: Any


def make_clients(provider_config: Mapping[str, Any]) -> GCPClients:
    """Build every Compute client strato uses; the only place ``compute_v1`` is imported.

    ``api_endpoint`` redirects all of them (REST transport); with an endpoint and no
    ``credentials_file`` they use anonymous credentials, else application defaults.
    """
    from google.api_core.client_options import ClientOptions
    from google.cloud import compute_v1

    endpoint = provider_config.get("api_endpoint")
    credentials = None
    if provider_config.get("credentials_file"):
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_file(
            os.path.expanduser(provider_config["credentials_file"]),
            scopes=["https://www.googleapis.com/auth/cloud-platform"])
    elif endpoint:
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    kwargs: dict[str, Any] = {"transport": "rest", "credentials": credentials}
    if endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
    return GCPClients(
        compute=compute_v1,
        instances=compute_v1.InstancesClient(**kwargs),
        zone_operations=compute_v1.ZoneOperationsClient(**kwargs),
        global_operations=compute_v1.GlobalOperationsClient(**kwargs),
        firewalls=compute_v1.FirewallsClient(**kwargs),
    )


def _api_errors() -> Any:
    from google.api_core import exceptions

    return exceptions


# ------------------------------------------------------------------ names and labels
def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:6]


def label_value(value: Any) -> str:
    """A tag value as a valid label value: lower-case ``[a-z0-9_-]``, at most 63 chars (a
    longer one keeps 56 and a hash of the whole, so long values never collide)."""
    text = re.sub(r"[^a-z0-9_-]", "-", str(value).lower())
    return text if len(text) <= 63 else f"{text[:56]}-{_short_hash(str(value))}"


def label_key(key: str) -> str:
    """A tag key as a valid label key (must also start with a letter)."""
    value = label_value(key)
    return value if value[:1].isalpha() else f"k{value}"[:63]


def resource_name(text: str, max_len: int = 63) -> str:
    """A valid GCE resource name: ``[a-z]([-a-z0-9]*[a-z0-9])?``."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    if not name[:1].isalpha():
        name = f"s-{name}"
    return name[:max_len].rstrip("-")


def cluster_prefix(cluster_name: str, max_len: int = 40) -> str:
    """``strato-<cluster>``: the start of instance names, the network tag and firewall
    rule names. A name that had to be shortened or rewritten ends in a hash of the
    cluster name, so two clusters never share a prefix (``a_b`` vs ``a-b``, or long
    names alike in their first 40 characters)."""
    plain = f"strato-{cluster_name}"
    name = resource_name(plain, max_len=max_len)
    if name == plain:
        return name
    return f"{resource_name(plain, max_len=max_len - 7)}-{_short_hash(cluster_name)}"


def _short(url: str) -> str:
    """Last path segment: ``.../zones/us-central1-a`` -> ``us-central1-a``."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _parse_time(text: str) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def accelerator_name(accelerator_type: str) -> str:
    """``nvidia-tesla-t4`` -> ``T4``; unknown types lose ``nvidia-``/``tesla-``, upper-cased."""
    short = _short(accelerator_type).removesuffix("-vws")
    if short in ACCELERATOR_NAMES:
        return ACCELERATOR_NAMES[short]
    return re.sub(r"^(nvidia-)?(tesla-)?", "", short).upper()


def machine_shape(machine_type: str) -> tuple[float | None, float | None, int, str | None]:
    """(vCPUs, GiB, built-in GPUs, built-in accelerator type) from a machine type name.

    Names encode the shape (``n1-standard-4``, ``a2-highgpu-2g``, ``n2-custom-8-32768``),
    so no API call is needed; unknown parts come back as None/0.
    """
    name = _short(machine_type)
    if name in _SHARED_CORE:
        cpus, gib = _SHARED_CORE[name]
        return float(cpus), float(gib), 0, None
    custom = re.search(r"(?:^|-)custom-(\d+)-(\d+)(?:-ext)?$", name)
    if custom:
        return float(custom.group(1)), int(custom.group(2)) / 1024, 0, None
    gpu = re.fullmatch(r"([a-z]\d+-[a-z]+gpu)-(\d+)g", name)
    if gpu and gpu.group(1) in _GPU_FAMILIES:
        acc, cpus_per_gpu, gib_per_gpu = _GPU_FAMILIES[gpu.group(1)]
        n = int(gpu.group(2))
        return float(cpus_per_gpu * n), float(gib_per_gpu * n), n, acc
    parts = name.split("-")
    cpus = float(parts[-1]) if len(parts) >= 3 and parts[-1].isdigit() else None
    if parts[0] == "g2" and cpus:
        return cpus, cpus * 4.0, _G2_GPUS.get(int(cpus), 1), "nvidia-l4"
    gib = None
    if cpus and len(parts) >= 3:
        per = _GIB_PER_VCPU.get((parts[0], parts[1])) or _GIB_PER_VCPU.get((parts[1],))
        gib = cpus * per if per else None
    return cpus, gib, 0, None


def _is_spot(inst: Any) -> bool:
    """Whether a compute_v1 Instance is a spot (or preemptible) VM."""
    return inst.scheduling.provisioning_model == "SPOT" or bool(inst.scheduling.preemptible)


# ------------------------------------------------------------------ errors
def _scheduling(value: Any) -> dict[str, Any]:
    """node_config's ``scheduling`` as one mapping; Ray's examples write it as a list of
    mappings (``- preemptible: true``), which are merged in order."""
    if isinstance(value, list):
        merged: dict[str, Any] = {}
        for part in value:
            if isinstance(part, Mapping):
                merged.update(part)
        return merged
    return dict(value or {})


def capacity_code(text: str) -> str | None:
    """The capacity code an error text amounts to, or None if it is not about capacity."""
    for marker, code in CAPACITY_MARKERS:
        if marker.lower() in text.lower():
            return code
    return None


def _http_error_text(exc: Exception) -> str:
    """Reasons and message of a google.api_core error, as one searchable line."""
    reasons = [str(e.get("reason", "")) for e in getattr(exc, "errors", None) or []
               if isinstance(e, Mapping)]
    reasons.append(str(getattr(exc, "reason", None) or ""))
    return " ".join([r for r in reasons if r] + [str(getattr(exc, "message", "") or exc)])


@dataclass
class _Failure:
    """One failed insert: code (GCE's, e.g. ZONE_RESOURCE_POOL_EXHAUSTED) and message."""

    code: str
    message: str

    @property
    def capacity(self) -> str | None:
        return capacity_code(f"{self.code} {self.message}")


# Names strato keeps in labels (cluster, node types): lower-case letters, digits, - and _.
_LABEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


# ------------------------------------------------------------------ provider
class GCPProvider(NodeProvider):
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
        if isinstance(name, str) and not _LABEL_NAME_RE.match(name):
            problems.append(ConfigProblem(("cluster_name",), "on gcp must be lower-case "
                                          "letters, digits, '-' or '_' (it is stored in "
                                          "labels)"))
        for name in types:
            if isinstance(name, str) and not _LABEL_NAME_RE.match(name):
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
        """Poll a zone (or global) operation until DONE with our own endpoint-aware client."""
        done = self.clients.compute.Operation.Status.DONE
        timeout = float(self.provider_config.get("operation_timeout_s", 900))
        deadline = time.monotonic() + timeout
        while operation.status != done:
            if time.monotonic() > deadline:
                raise ProviderError(f"GCE operation {operation.name} not done after "
                                    f"{timeout:.0f}s")
            if zone:
                operation = self.clients.zone_operations.wait(
                    project=self.project, zone=zone, operation=operation.name)
            else:
                operation = self.clients.global_operations.wait(
                    project=self.project, operation=operation.name)
        return operation

    @staticmethod
    def _operation_failure(operation: Any) -> _Failure | None:
        errors = list(operation.error.errors) if "error" in operation else []
        if not errors:
            return None
        return _Failure(code=errors[0].code,
                        message="; ".join(e.message or e.code for e in errors))

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
        errors = _api_errors()
        try:
            self.clients.firewalls.get(project=self.project, firewall=body["name"])
            return
        except errors.NotFound:
            pass
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE firewall {body['name']}: {_http_error_text(e)}") from e
        resource = self.clients.compute.Firewall.from_json(json.dumps(body))
        try:
            op = self.clients.firewalls.insert_unary(project=self.project,
                                                     firewall_resource=resource)
        except errors.Conflict:
            return  # created meanwhile by another strato process
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE firewall {body['name']}: {_http_error_text(e)}") from e
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

        scheduling = _scheduling(body.get("scheduling"))
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
        errors = _api_errors()
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
        failures: list[_Failure] = []
        for name, resource in bodies:
            try:
                # requestId: a retried insert whose answer was lost returns the same
                # operation instead of failing or creating another instance
                op = self.clients.instances.insert_unary(
                    request={"project": self.project, "zone": zone,
                             "instance_resource": resource, "request_id": str(uuid.uuid4())})
            except errors.GoogleAPICallError as e:
                failures.append(_Failure(code=str(e.code), message=_http_error_text(e)))
                break  # the rest would fail the same way
            started.append((name, op))

        created: list[str] = []
        for name, op in started:
            try:
                failure = self._operation_failure(self._wait(op, zone))
            except errors.GoogleAPICallError as e:
                failure = _Failure(code=str(e.code), message=_http_error_text(e))
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
                              failures: list[_Failure], created: list[str], count: int) -> None:
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

    # -------------------------------------------------------------- list
    def _node(self, inst: Any, preempted_ops: Collection[str] = ()) -> Node:
        name = inst.name
        labels = dict(inst.labels)
        zone = _short(inst.zone)
        self._zones[name] = zone
        self._last_tags[name] = labels
        state = _STATE_MAP.get(inst.status, NodeState.PENDING)
        spot = _is_spot(inst)
        stopped = state == NodeState.STOPPED
        private_ip = public_ip = None
        if inst.network_interfaces:
            nic = inst.network_interfaces[0]
            private_ip = nic.network_i_p or None
            if nic.access_configs:
                public_ip = nic.access_configs[0].nat_i_p or None
        return Node(
            id=name, state=state, tags={**labels, TAG_NAME: name},
            private_ip=private_ip, public_ip=public_ip, spot=spot,
            # GCE lists the preempted operation at once, while the VM is still STOPPING
            # through its shutdown grace: it is preempted from then on, not "stopping"
            preempted=name in preempted_ops or (stopped and spot),
            zone=zone, instance_type=_short(inst.machine_type) or None,
            launch_time=_parse_time(inst.creation_timestamp),
        )

    def _filter(self, tag_filters: Mapping[str, str]) -> str:
        labels = {label_key(k): label_value(v) for k, v in tag_filters.items() if k != TAG_NAME}
        labels[TAG_CLUSTER] = label_value(self.cluster_name)
        return " AND ".join(f'(labels.{k} = "{v}")' for k, v in sorted(labels.items()))

    @staticmethod
    def _matches(node: Node, tag_filters: Mapping[str, str]) -> bool:
        for key, value in tag_filters.items():
            if key == TAG_NAME:
                if node.id != value:
                    return False
            elif node.tags.get(label_key(key)) != label_value(value):
                return False
        return True

    def _list_instances(self, tag_filters: Mapping[str, str]) -> list[Any]:
        errors = _api_errors()
        request = {"project": self.project, "filter": self._filter(tag_filters)}
        try:
            return [inst for _, scoped in self.clients.instances.aggregated_list(request=request)
                    for inst in scoped.instances]
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE list instances: {_http_error_text(e)}") from e

    def _preempted_operations(self) -> dict[str, tuple[str, float | None]]:
        """Instance name -> (zone, time) of recent preemptions of this cluster's instances."""
        errors = _api_errors()
        lookback = float(self.provider_config.get("preemption_lookback_s", 3600))
        request = {"project": self.project,
                   "filter": f'operationType = "{PREEMPTED_OPERATION}"'}
        found: dict[str, tuple[str, float | None]] = {}
        try:
            pages = self.clients.global_operations.aggregated_list(request=request)
            operations = [op for _, scoped in pages for op in scoped.operations]
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE list operations: {_http_error_text(e)}") from e
        for op in operations:
            name = _short(op.target_link)
            if not (self._name_re.fullmatch(name) or name in self._last_tags):
                continue
            when = _parse_time(op.insert_time)
            if when is not None and when < time.time() - lookback:
                continue
            found[name] = (_short(op.zone), when)
        return found

    def list_nodes(self, tag_filters: Mapping[str, str] | None = None, *,
                   include_terminated: bool = False) -> list[Node]:
        """Instances with this cluster's label (and ``tag_filters``), from every zone,
        stopped ones (GCE ``TERMINATED``/``SUSPENDED``) included.

        Preempted spot instances that GCE stopped, and those it deleted (found from
        ``compute.instances.preempted`` operations), are returned only with
        ``include_terminated``.
        """
        tag_filters = dict(tag_filters or {})
        preempted = self._preempted_operations() if include_terminated else {}
        nodes = [self._node(inst, set(preempted))
                 for inst in self._list_instances(tag_filters)]
        nodes = [n for n in nodes if self._matches(n, tag_filters) and (
            include_terminated or n.state != NodeState.STOPPED or not n.preempted)]
        present = {n.id for n in nodes}
        for name, (zone, _when) in sorted(preempted.items()):
            if name in present or name in self._deleted:
                continue
            known = self._last_tags.get(name)
            if known is None:
                match = self._name_re.fullmatch(name)
                known = {TAG_CLUSTER: label_value(self.cluster_name),
                         TAG_KIND: match.group(1) if match else ""}
            tags = {**known, TAG_NAME: name}
            gone = Node(id=name, state=NodeState.TERMINATED, tags=tags, spot=True,
                        preempted=True, zone=zone or None)
            if not self._matches(gone, tag_filters):
                continue
            # Without filters every surviving instance is in ``present``; with them, a
            # stopped (not deleted) instance may just have been filtered out.
            if tag_filters and self._instance_exists(name, zone):
                continue
            nodes.append(gone)
        return nodes

    def _instance_exists(self, name: str, zone: str) -> bool:
        errors = _api_errors()
        if not zone:
            return False
        try:
            self.clients.instances.get(project=self.project, zone=zone, instance=name)
        except errors.NotFound:
            return False
        return True

    # -------------------------------------------------------------- terminate / tags
    def _zone_of(self, name: str) -> str | None:
        """The zone of one of our instances (one listing refreshes all we don't know)."""
        if name not in self._zones:
            for inst in self._list_instances({}):
                self._zones[inst.name] = _short(inst.zone)
        return self._zones.get(name)

    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Delete the instances (all requests first, then wait); missing ones are ignored."""
        errors = _api_errors()
        pending: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        names = list(dict.fromkeys(node_ids))
        if any(name not in self._zones for name in names):
            self._zone_of(next(n for n in names if n not in self._zones))
        for name in names:
            zone = self._zones.get(name)
            self._deleted.add(name)
            if zone is None:
                continue
            try:
                op = self.clients.instances.delete_unary(
                    project=self.project, zone=zone, instance=name)
            except errors.NotFound:
                continue
            except errors.GoogleAPICallError as e:
                problems.append(f"{name}: {_http_error_text(e)}")
                continue
            pending.append((name, zone, op))
        for name, zone, op in pending:
            try:
                failure = self._operation_failure(self._wait(op, zone))
            except errors.NotFound:
                failure = None
            if failure and "NOT_FOUND" not in failure.code:
                problems.append(f"{name}: {failure.message}")
        for name in node_ids:
            self._zones.pop(name, None)
        if problems:
            raise ProviderError("GCE could not delete " + "; ".join(problems))

    # -------------------------------------------------------------- stop / start
    def _current(self, names: Collection[str]) -> dict[str, Any]:
        """The instances of these names that exist now (one listing; zones refreshed)."""
        found = {}
        for inst in self._list_instances({}):
            self._zones[inst.name] = _short(inst.zone)
            if inst.name in names:
                found[inst.name] = inst
        return found

    def _wait_all(self, pending: list[tuple[str, str, Any]], problems: list[str]) -> None:
        """Wait for every (name, zone, operation); failures other than NOT_FOUND are added
        to ``problems`` (with a capacity code where GCE gave one)."""
        errors = _api_errors()
        for name, zone, op in pending:
            try:
                failure = self._operation_failure(self._wait(op, zone))
            except errors.NotFound:
                failure = None
            if failure and "NOT_FOUND" not in failure.code:
                problems.append(f"{name}: [{failure.capacity or failure.code}] "
                                f"{failure.message}")

    def stop_nodes(self, node_ids: Sequence[str]) -> None:
        """Stop on-demand instances and wait until they are ``TERMINATED`` (stopped, disk
        kept); spot instances are deleted instead (see the module docstring). Instances
        already stopped or stopping, and names GCE no longer knows, are skipped."""
        names = list(dict.fromkeys(node_ids))
        if not names:
            return
        errors = _api_errors()
        current = self._current(set(names))
        spot = [n for n in names if n in current and _is_spot(current[n])]
        if spot:
            self.terminate_nodes(spot)
        pending: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        for name in names:
            inst = current.get(name)
            if inst is None or name in spot or inst.status not in _STOPPABLE:
                continue
            zone = _short(inst.zone)
            try:
                op = self.clients.instances.stop_unary(project=self.project, zone=zone,
                                                       instance=name)
            except errors.NotFound:
                continue
            except errors.GoogleAPICallError as e:
                problems.append(f"{name}: {_http_error_text(e)}")
                continue
            pending.append((name, zone, op))
        self._wait_all(pending, problems)
        if problems:
            raise ProviderError("GCE could not stop " + "; ".join(problems))

    def start_nodes(self, node_ids: Sequence[str], timeout: float = 600.0) -> None:
        """Start stopped (``TERMINATED``) instances once none is still ``STOPPING``, and
        wait until they are ``RUNNING``. Names GCE no longer knows are skipped (a VM that
        was being deleted, not stopped); running ones are left as they are."""
        names = list(dict.fromkeys(node_ids))
        if not names:
            return
        errors = _api_errors()
        deadline = time.monotonic() + timeout
        while True:
            current = self._current(set(names))
            busy = sorted(n for n, i in current.items() if i.status in _SETTLING)
            if not busy:
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"GCE: {', '.join(busy)} still stopping after "
                                    f"{timeout:.0f}s")
            time.sleep(_POLL_S)
        pending: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        for name, inst in current.items():
            if inst.status == "SUSPENDED":
                problems.append(f"{name}: it is SUSPENDED (strato does not resume "
                                "instances: resume or delete it)")
                continue
            if inst.status != "TERMINATED":
                continue
            zone = _short(inst.zone)
            try:
                op = self.clients.instances.start_unary(project=self.project, zone=zone,
                                                        instance=name)
            except errors.GoogleAPICallError as e:
                problems.append(f"{name}: {_http_error_text(e)}")
                continue
            pending.append((name, zone, op))
        self._wait_all(pending, problems)
        if problems:
            raise ProviderError("GCE could not start " + "; ".join(problems))
        started = {name for name, _, _ in pending}
        while started:
            current = self._current(started)
            states = {n: current[n].status if n in current else "deleted" for n in started}
            if all(s == "RUNNING" for s in states.values()):
                return
            if time.monotonic() > deadline or any(
                    s in ("deleted", "TERMINATED", "STOPPING") for s in states.values()):
                raise ProviderError("GCE: started " + ", ".join(
                    f"{n} but it is {s}" for n, s in sorted(states.items())))
            time.sleep(_POLL_S)

    def set_tags(self, node_id: str, tags: Mapping[str, str]) -> None:
        """Merge ``tags`` into the instance's labels (retrying if they changed meanwhile)."""
        errors = _api_errors()
        zone = self._zone_of(node_id)
        if zone is None:
            raise ProviderError(f"GCE instance {node_id} not found")
        new = {label_key(k): label_value(v) for k, v in tags.items() if k != TAG_NAME}
        for attempt in range(5):
            try:
                inst = self.clients.instances.get(project=self.project, zone=zone,
                                                  instance=node_id)
                labels = {**dict(inst.labels), **new}
                op = self.clients.instances.set_labels_unary(
                    project=self.project, zone=zone, instance=node_id,
                    instances_set_labels_request_resource={
                        "labels": labels, "label_fingerprint": inst.label_fingerprint})
                failure = self._operation_failure(self._wait(op, zone))
            except errors.PreconditionFailed:
                if attempt == 4:
                    raise ProviderError(f"GCE labels of {node_id} keep changing") from None
                continue
            except errors.GoogleAPICallError as e:
                raise ProviderError(f"GCE set labels on {node_id}: "
                                    f"{_http_error_text(e)}") from e
            if failure:
                raise ProviderError(f"GCE set labels on {node_id}: {failure.message}")
            self._last_tags[node_id] = labels
            return

    # -------------------------------------------------------------- catalogue
    catalog_cloud = "gcp"

    def catalog_region(self, zone: str | None = None) -> str | None:
        """GCP regions are zones without their last ``-x``."""
        zone = zone or self.default_zone
        return zone.rsplit("-", 1)[0] if zone else self.provider_config.get("region")

    def instance_type_of(self, spec: NodeTypeSpec) -> str | None:
        return _short(spec.node_config.get("machineType") or "") or None

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


PROVIDER = GCPProvider
