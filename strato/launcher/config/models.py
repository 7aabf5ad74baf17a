"""The cluster config as typed models (pydantic): provider, auth, node types,
autoscaler, autostop, and the hashes that tell `up` what to reuse or replace."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from strato.catalog import (
    AcceleratorRequest,
    parse_accelerators,
    parse_any_of,
)
from strato.exceptions import ConfigError
from strato.launcher.config.report import describe, pydantic_message
from strato.providers import PROVIDER_TYPES, provider_class
from strato.providers.base import NodeProvider, NodeTypeSpec
from strato.ssh.files import CopyFilter

DEFAULT_GLOBAL_MAX_WORKERS = 2  # Ray's default
MAX_NODES = 100_000  # the most workers a count may ask for: more is a typo, not a cluster

KeyPath = tuple[str | int, ...]
NonNegativeFloat = Annotated[float, Field(ge=0)]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")



# ---------------------------------------------------------------- models
class _Section(BaseModel):
    """Base of config sections: unknown keys are errors, Ray-only keys are warnings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # key -> why strato ignores it (shown in the warning)
    ray_only_keys: ClassVar[dict[str, str]] = {}


class ProviderConfig(BaseModel):
    """``provider:``; known keys typed, any other key kept for the provider to read."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    type: str
    region: str | None = None
    availability_zone: str | None = None  # Ray allows "us-east-1a,us-east-1b"
    project_id: str | None = None
    head_ip: str | None = None
    worker_ips: list[str] = Field(default_factory=list)
    endpoint_url: str | None = None  # aws: EC2 endpoint override (tests point it at moto)
    api_endpoint: str | None = None  # gcp: Compute API endpoint override
    monitor: Literal["head", "local", "off"] | None = None  # where the autoscaler runs
    head_port: int = Field(6380, ge=1, le=65535)  # the head's runtime port
    # local provider: spot nodes watch this cloud's notice format (base URL from
    # STRATO_AWS_METADATA_URL / STRATO_GCE_METADATA_URL), to rehearse preemptions locally
    spot_notice: Literal["aws", "gcp"] | None = None

    @property
    def extras(self) -> dict[str, Any]:
        """Provider-specific keys strato does not type (e.g. ``security_group``)."""
        return dict(self.model_extra or {})


class AuthConfig(_Section):
    """``auth:``; how the launcher logs in to the head (and SSH hosts)."""

    ray_only_keys: ClassVar[dict[str, str]] = {
        "ssh_proxy_command": "not supported by strato's SSH client",
        "ssh_public_key": "not used; providers derive the public key from ssh_private_key",
    }

    ssh_user: str | None = None  # filled from the provider type, see ClusterConfig
    ssh_private_key: str | None = None  # None: the provider creates or finds one
    ssh_port: int = Field(22, ge=1, le=65535)


class NodeTypeConfig(_Section):
    """One entry of ``available_node_types``: what to launch and how many."""

    ray_only_keys: ClassVar[dict[str, str]] = {
        "docker": "strato runs on the host Python, not in a container",
        "labels": "node labels are not supported",
    }

    node_config: dict[str, Any] = Field(default_factory=dict)  # passed to the cloud API
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    min_workers: int = Field(0, ge=0, le=MAX_NODES)
    # Default: the global max_workers (as Ray), but 0 for the head node type so the
    # autoscaler never launches extra copies of the head unless asked to.
    max_workers: int = Field(0, ge=0, le=MAX_NODES)
    spot: bool = False
    fallback_to_on_demand: bool = False
    zones: list[str] = Field(default_factory=list)  # tried in order
    max_price: float | None = Field(None, gt=0)  # per hour; None: the on-demand price
    # GPUs by name instead of an instance type in node_config: "A100:8", "L4" or {L4: 1};
    # strato launches the cheapest catalogue type that carries them (see strato.catalog)
    accelerators: str | dict[str, int] | None = None
    any_of: list[Any] | None = None  # alternatives in order: [{accelerators: A100:8}, ...]
    cloud: str | None = None  # optional with accelerators: must be the provider's
    region: str | None = None  # optional with accelerators: must be the provider's
    runtime_python: str | None = None
    worker_setup_commands: list[str] | None = None  # Ray: replaces the global list


class AutoscalerConfig(_Section):
    """``autoscaler:``; knobs of the loop that runs beside the head."""

    # at most an hour: a longer tick is no autoscaler (and a huge one overflows its timer)
    tick_seconds: float = Field(5.0, gt=0, le=3600)
    # Consecutive failed launches of one node type before it is skipped for a while.
    max_launch_failures: int = Field(3, ge=1)


class AutostopConfig(_Section):
    """``autostop:``; the head's monitor tears the whole cluster down once nothing (task,
    actor, durable call, client session) has been active for ``idle_minutes``. ``down``:
    terminate every node (default); false: stop them where the cloud can (AWS, GCE; the
    next ``up`` starts them again), terminate elsewhere. ``autostop: 10`` is short for
    ``{idle_minutes: 10}``; absent or ``false``: off."""

    idle_minutes: float = Field(gt=0)
    down: bool = True

    @classmethod
    def parse(cls, value: Any) -> AutostopConfig | None:
        """A setting from minutes, a mapping, an ``AutostopConfig``, or None/False (off)."""
        if value is None or value is False:
            return None
        if isinstance(value, AutostopConfig):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
            raise ConfigError(f"autostop: expected minutes (a number), a mapping "
                              f"{{idle_minutes, down}} or false, got {describe(value)}")
        try:
            return cls.model_validate(
                {"idle_minutes": value} if isinstance(value, (int, float)) else dict(value))
        except ValidationError as e:
            raise ConfigError("autostop: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {pydantic_message(err)}"
                for err in e.errors(include_url=False))) from None


class ClusterConfig(_Section):
    """The whole cluster YAML. Build it with ``load_config`` / ``load_config_from_dict``."""

    ray_only_keys: ClassVar[dict[str, str]] = {
        "head_start_ray_commands": "strato starts its own runtime",
        "worker_start_ray_commands": "strato starts its own runtime",
        "docker": "strato runs on the host Python, not in a container",
        "cluster_synced_files": "use file_mounts",
        "file_mounts_sync_continuously": "file_mounts are synced on `strato up` only",
        "head_node": "legacy Ray format, ignored beside available_node_types",
        "worker_nodes": "legacy Ray format, ignored beside available_node_types",
        "min_workers": "set min_workers per node type",
        "initial_workers": "legacy Ray key; set min_workers per node type",
        "autoscaling_mode": "legacy Ray key",
        "target_utilization_fraction": "legacy Ray key",
        "head_node_type_resources": "set resources on the node type",
    }

    cluster_name: str = "default"
    max_workers: int = Field(DEFAULT_GLOBAL_MAX_WORKERS, ge=0, le=MAX_NODES)  # head excluded
    upscaling_speed: float = Field(1.0, ge=0)
    idle_timeout_minutes: float = Field(5.0, ge=0)
    provider: ProviderConfig
    auth: AuthConfig = Field(default_factory=AuthConfig)
    available_node_types: dict[str, NodeTypeConfig]
    head_node_type: str
    file_mounts: dict[str, str] = Field(default_factory=dict)  # remote path -> local path
    # left out of file mounts and rsync-up/down: gitignore-style patterns, and names of
    # pattern files (.gitignore) found in the copied tree (as Ray's rsync options)
    rsync_exclude: list[str] = Field(default_factory=list)
    rsync_filter: list[str] = Field(default_factory=list)
    initialization_commands: list[str] = Field(default_factory=list)
    setup_commands: list[str] = Field(default_factory=list)
    head_setup_commands: list[str] = Field(default_factory=list)
    worker_setup_commands: list[str] = Field(default_factory=list)
    runtime_python: str | None = None  # an existing Python with strato: no wheel install
    autoscaler: AutoscalerConfig = Field(default_factory=AutoscalerConfig)
    autostop: AutostopConfig | None = None

    _warnings: list[str] = PrivateAttr(default_factory=list)
    _notes: list[str] = PrivateAttr(default_factory=list)
    _source: str = PrivateAttr(default="<dict>")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return fill_defaults(data) if isinstance(data, dict) else data

    @field_validator("autostop", mode="before")
    @classmethod
    def _autostop_short(cls, value: Any) -> Any:
        """``autostop: 10`` means ``{idle_minutes: 10}``; ``autostop: false`` means off."""
        if value is False:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"idle_minutes": value}
        return value

    # ------------------------------------------------------------ facts
    @property
    def warnings(self) -> list[str]:
        """Non-fatal problems (Ray-only keys, likely mistakes), ``FILE:LINE: path: text``."""
        return list(self._warnings)

    @property
    def notes(self) -> list[str]:
        """What strato translated from Ray's idioms (legacy keys, spot settings in
        node_config), ``FILE:LINE: path: text``."""
        return list(self._notes)

    def copy_filter(self) -> CopyFilter:
        """What file mounts and rsync-up/down leave out (``rsync_exclude``/``rsync_filter``)."""
        return CopyFilter(self.rsync_exclude, self.rsync_filter)

    @property
    def source(self) -> str:
        """The file this config came from (or ``<dict>``)."""
        return self._source

    def node_type(self, name: str) -> NodeTypeConfig:
        """The node type called ``name``; ``ConfigError`` naming the known ones if absent."""
        try:
            return self.available_node_types[name]
        except KeyError:
            known = ", ".join(sorted(self.available_node_types))
            raise ConfigError(f"unknown node type {name!r} (known: {known})") from None

    def node_type_spec(self, name: str) -> NodeTypeSpec:
        """What a provider needs to create nodes of this type.

        Zones: the type's ``zones``, else the provider's ``availability_zone`` (which may
        be a comma-separated list, as in Ray), else none (the provider's default).
        """
        nt = self.node_type(name)
        zones = tuple(nt.zones)
        if not zones and self.provider.availability_zone:
            zones = tuple(z.strip() for z in self.provider.availability_zone.split(",")
                          if z.strip())
        resources = dict(nt.resources)
        requests = self.accelerator_requests(name)
        if requests:  # what every choice offers; the node detects CPU and memory itself
            counts = {r.count for r in requests}
            if len(counts) == 1:
                resources.setdefault("GPU", float(requests[0].count))
            if len(requests) == 1:
                resources.setdefault(f"accelerator_type:{requests[0].name}", 1.0)
        return NodeTypeSpec(name=name, node_config=dict(nt.node_config), spot=nt.spot,
                            zones=zones, max_price=nt.max_price, resources=resources)

    def accelerator_requests(self, name: str) -> list[AcceleratorRequest]:
        """The GPUs a node type names (``accelerators`` or ``any_of``), in order; [] if
        it names an instance type in ``node_config`` instead."""
        nt = self.node_type(name)
        if nt.any_of:
            return parse_any_of(nt.any_of)
        return [parse_accelerators(nt.accelerators)] if nt.accelerators else []

    def runtime_python_for(self, name: str) -> str | None:
        """The Python to run strato with on this type; None means install strato."""
        return self.node_type(name).runtime_python or self.runtime_python

    def head_setup(self) -> list[str]:
        """Setup commands of the head: ``setup_commands`` + ``head_setup_commands`` (Ray)."""
        return [*self.setup_commands, *self.head_setup_commands]

    def worker_setup(self, node_type: str | None = None) -> list[str]:
        """Setup commands of a worker: ``setup_commands`` + the worker list.

        A node type's own ``worker_setup_commands`` replaces the global list, as in Ray.
        """
        own = self.node_type(node_type).worker_setup_commands if node_type else None
        return [*self.setup_commands, *(self.worker_setup_commands if own is None else own)]

    def launch_hash(self, node_type: str) -> str:
        """Hash of what the machine *is*: a change means the node must be replaced."""
        spec = self.node_type_spec(node_type)
        return stable_hash({
            "provider": [self.provider.type, self.provider.region, self.provider.project_id],
            "node_config": spec.node_config,
            **({"accelerators": [str(r) for r in self.accelerator_requests(node_type)]}
               if self.accelerator_requests(node_type) else {}),
            "spot": spec.spot,
            "zones": list(spec.zones),
            "max_price": spec.max_price,
        })

    def setup_hash(self, node_type: str, *, head: bool | None = None) -> str:
        """Hash of what is *installed*: a change means setup must run again.

        Covers file mount paths and the local files' contents, initialization and setup
        commands for the node's kind, ``runtime_python`` and the advertised resources.
        ``head`` defaults to whether ``node_type`` is the head node type.
        """
        if head is None:
            head = node_type == self.head_node_type
        nt = self.node_type(node_type)
        copy_filter = self.copy_filter()
        return stable_hash({
            "file_mounts": {remote: [local, digest_path(local, copy_filter)]
                            for remote, local in sorted(self.file_mounts.items())},
            **({"rsync": [self.rsync_exclude, self.rsync_filter]} if copy_filter else {}),
            "initialization_commands": self.initialization_commands,
            "setup": self.head_setup() if head else self.worker_setup(node_type),
            "runtime_python": self.runtime_python_for(node_type),
            "resources": dict(nt.resources),
        })

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with defaults filled (for providers' ``prepare``)."""
        return self.model_dump(mode="json")



# ---------------------------------------------------------------- hashes
def stable_hash(obj: Any) -> str:
    """sha1 of canonical JSON: 40 hex chars, fits in a GCP label value."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def digest_path(local: str, copy_filter: CopyFilter | None = None) -> str:
    """Digest of a file mount's local contents (what is copied), so editing a mounted
    file re-runs setup, and files the filter leaves out do not."""
    root = Path(os.path.expanduser(local))
    h = hashlib.sha1(usedforsecurity=False)
    if root.is_file():
        h.update(root.read_bytes())
    elif root.is_dir():
        walk = (copy_filter or CopyFilter()).walk_local(root)
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirnames[:] = sorted(d for d in dirnames if not walk.excluded(prefix + d, True))
            for fname in sorted(filenames):
                if walk.excluded(prefix + fname, False):
                    continue
                f = Path(dirpath, fname)
                h.update(str(f.relative_to(root)).encode() + b"\0")
                try:
                    h.update(f.read_bytes())
                except OSError:
                    h.update(b"<unreadable>")
    else:
        return "missing"
    return h.hexdigest()
def current_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (some containers)
        return os.environ.get("USER", "root")




# ---------------------------------------------------------------- defaults
def fill_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Ray-style defaults that depend on other keys (per-type max_workers, ssh_user)."""
    data = dict(data)
    gmax = data.get("max_workers", DEFAULT_GLOBAL_MAX_WORKERS)
    types = data.get("available_node_types")
    if isinstance(types, dict):
        filled = {}
        for name, nt in types.items():
            if isinstance(nt, dict) and nt.get("max_workers") is None:
                nt = {**nt, "max_workers": 0 if name == data.get("head_node_type") else gmax}
            filled[name] = nt
        data["available_node_types"] = filled
    auth = data.get("auth", {})
    if isinstance(auth, dict) and not auth.get("ssh_user"):
        provider = data.get("provider")
        provider_cls = provider_class_of(provider.get("type") if isinstance(provider, dict)
                                       else None)
        default = provider_cls.default_ssh_user if provider_cls else None
        data["auth"] = {**auth, "ssh_user": default or current_user()}
    return data




def provider_class_of(ptype: Any) -> type[NodeProvider] | None:
    """The provider class of a ``provider.type`` value, None if it names none."""
    return provider_class(ptype) if isinstance(ptype, str) and ptype in PROVIDER_TYPES \
        else None
