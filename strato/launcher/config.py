"""The cluster YAML: parsed with line numbers, validated into typed models.

Key names follow Ray's cluster YAML where the meaning is the same, so Ray users can bring
their files; strato adds spot fields per node type. Every problem is reported as
``FILE:LINE: key.path: message`` (all of them at once, in one ``ConfigError``); keys only
Ray needs become warnings on ``ClusterConfig.warnings`` instead of errors. What strato
translates from Ray's idioms (the legacy ``head_node``/``worker_nodes`` format, a cloud's
own spot settings in ``node_config``) is said on ``ClusterConfig.notes``, same format.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
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
    CatalogError,
    check_available,
    load_catalog,
    parse_accelerators,
    parse_any_of,
)
from strato.exceptions import ConfigError
from strato.providers import PROVIDER_TYPES, provider_class
from strato.providers.base import NodeProvider, NodeTypeSpec
from strato.ssh.files import CopyFilter

__all__ = [
    "PROVIDER_TYPES",
    "AuthConfig",
    "AutoscalerConfig",
    "AutostopConfig",
    "ClusterConfig",
    "NodeTypeConfig",
    "ProviderConfig",
    "load_config",
    "load_config_from_dict",
]

DEFAULT_GLOBAL_MAX_WORKERS = 2  # Ray's default

KeyPath = tuple[str | int, ...]
NonNegativeFloat = Annotated[float, Field(ge=0)]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# ---------------------------------------------------------------- models
class _Section(BaseModel):
    """Base of config sections: unknown keys are errors, Ray-only keys are warnings."""

    model_config = ConfigDict(extra="forbid")

    # key -> why strato ignores it (shown in the warning)
    ray_only_keys: ClassVar[dict[str, str]] = {}


class ProviderConfig(BaseModel):
    """``provider:``; known keys typed, any other key kept for the provider to read."""

    model_config = ConfigDict(extra="allow")

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
    min_workers: int = Field(0, ge=0)
    # Default: the global max_workers (as Ray), but 0 for the head node type so the
    # autoscaler never launches extra copies of the head unless asked to.
    max_workers: int = Field(0, ge=0)
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

    tick_seconds: float = Field(5.0, gt=0)
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
                              f"{{idle_minutes, down}} or false, got {_describe(value)}")
        try:
            return cls.model_validate(
                {"idle_minutes": value} if isinstance(value, (int, float)) else dict(value))
        except ValidationError as e:
            raise ConfigError("autostop: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {_pydantic_message(err)}"
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
    max_workers: int = Field(DEFAULT_GLOBAL_MAX_WORKERS, ge=0)  # workers, head excluded
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
        return _fill_defaults(data) if isinstance(data, dict) else data

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
        return _stable_hash({
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
        return _stable_hash({
            "file_mounts": {remote: [local, _digest_path(local, copy_filter)]
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


# ---------------------------------------------------------------- loading
def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read, parse and validate a cluster YAML file; ``ConfigError`` lists every problem."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{source}: cannot read cluster config: {e.strerror or e}") from None
    data, lines, problems = _parse_yaml(text)
    return _build(data, source, lines, problems)


def load_config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> ClusterConfig:
    """Validate an already-parsed config (no line numbers in messages)."""
    return _build(data, source, None, [])


def _build(data: Any, source: str, lines: dict[KeyPath, int] | None,
           problems: list[tuple[KeyPath, str]]) -> ClusterConfig:
    report = _Report(source, lines)
    for path, msg in problems:
        report.error(path, msg)
    if report.errors:  # YAML syntax: nothing else to check
        raise report.config_error()
    if data is None:
        report.error((), "the file is empty; expected a mapping with provider, "
                         "available_node_types and head_node_type")
        raise report.config_error()
    if not isinstance(data, Mapping):
        report.error((), f"the top level must be a mapping of keys, got {_describe(data)}")
        raise report.config_error()

    data = _translate_legacy(dict(data), report)
    cleaned = _check_keys(data, ClusterConfig, (), report)
    _apply_spot_idioms(cleaned, report)
    _check_semantics(cleaned, report)
    try:
        config = ClusterConfig.model_validate(cleaned)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            report.error(tuple(err["loc"]), _pydantic_message(err))
        config = None
    if report.errors or config is None:
        raise report.config_error()
    config._warnings = report.sorted(report.warnings)
    config._notes = report.sorted(report.notes)
    config._source = source
    return config


class _Report:
    """Collects errors and warnings, each placed at a key path and its file line."""

    def __init__(self, source: str, lines: dict[KeyPath, int] | None):
        self.source = source
        self.lines = lines
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        self.notes: list[tuple[int, str]] = []
        self._seen: set[str] = set()

    def _line(self, path: KeyPath) -> int | None:
        if self.lines is None:
            return None
        for n in range(len(path), 0, -1):  # a missing key: point at its parent
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return 1

    def _format(self, path: KeyPath, msg: str) -> tuple[int, str]:
        line = self._line(path)
        where = self.source if line is None else f"{self.source}:{line}"
        return (line or 0, f"{where}: {_format_path(path)}: {msg}")

    def error(self, path: KeyPath, msg: str) -> None:
        item = self._format(path, msg)
        if item[1] not in self._seen:  # semantic and type checks may say the same thing
            self._seen.add(item[1])
            self.errors.append(item)

    def warn(self, path: KeyPath, msg: str) -> None:
        self.warnings.append(self._format(path, msg))

    def note(self, path: KeyPath, msg: str) -> None:
        self.notes.append(self._format(path, msg))

    def alias(self, new: KeyPath, old: KeyPath) -> None:
        """Lines of the keys at ``old`` (and below) also for ``new`` (translated keys)."""
        if self.lines is None:
            return
        for path, line in list(self.lines.items()):
            if path[:len(old)] == old:
                self.lines.setdefault((*new, *path[len(old):]), line)

    @staticmethod
    def sorted(items: list[tuple[int, str]]) -> list[str]:
        return [text for _, text in sorted(items, key=lambda it: it[0])]

    def config_error(self) -> ConfigError:
        problems = self.sorted(self.errors)
        err = ConfigError("\n".join(problems))
        err.problems = problems  # type: ignore[attr-defined]
        return err


# ---------------------------------------------------------------- YAML with lines
class _LineLoader(yaml.SafeLoader):
    """SafeLoader; we compose the node tree first to read each key's line."""


def _parse_yaml(text: str) -> tuple[Any, dict[KeyPath, int], list[tuple[KeyPath, str]]]:
    """Parse ``text``; return the data, a key path -> line table, and problems."""
    lines: dict[KeyPath, int] = {}
    problems: list[tuple[KeyPath, str]] = []
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines, problems
        _record_lines(node, (), lines, problems)  # before construct: merges mutate nodes
        return loader.construct_document(node), lines, problems
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            lines[("<yaml>",)] = mark.line + 1
        what = " ".join(str(s) for s in (e.context, e.problem) if s)
        problems.append((("<yaml>",), f"YAML syntax error: {what}"))
        return None, lines, problems
    except yaml.YAMLError as e:
        problems.append((("<yaml>",), f"YAML error: {e}"))
        return None, lines, problems
    finally:
        loader.dispose()


def _record_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int],
                  problems: list[tuple[KeyPath, str]], *, merged: bool = False) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            sub = (*path, key)
            if key in seen and not merged:
                lines[sub] = key_node.start_mark.line + 1
                problems.append((sub, "duplicate key; the later value would silently win"))
            seen.add(key)
            if merged:
                lines.setdefault(sub, key_node.start_mark.line + 1)
            else:
                lines[sub] = key_node.start_mark.line + 1
            _record_lines(value_node, sub, lines, problems, merged=merged)
        for m in merges:  # explicit keys win over keys merged in with <<
            for mapping in (m.value if isinstance(m, yaml.SequenceNode) else [m]):
                _record_lines(mapping, path, lines, problems, merged=True)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if merged:
                lines.setdefault((*path, i), item.start_mark.line + 1)
            else:
                lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(item, (*path, i), lines, problems, merged=merged)


# ---------------------------------------------------------------- checks
def _check_keys(data: dict[Any, Any], model: type[BaseModel], path: KeyPath,
                report: _Report) -> dict[str, Any]:
    """Drop Ray-only keys (warning) and unknown keys (error, with a suggestion).

    Keys given with no value (``setup_commands:``) mean "the default", as in Ray.
    """
    fields = model.model_fields
    ray_only: dict[str, str] = getattr(model, "ray_only_keys", {})
    allows_extra = model.model_config.get("extra") == "allow"
    cleaned: dict[str, Any] = {}
    for key, value in data.items():
        sub = (*path, key)
        if not isinstance(key, str):
            report.error(sub, f"keys must be strings, got {_describe(key)}")
        elif key in fields:
            if value is None and not fields[key].is_required():
                continue
            cleaned[key] = _check_nested(value, fields[key].annotation, sub, report)
        elif key in ray_only:
            report.warn(sub, f"Ray-only key, ignored by strato ({ray_only[key]})")
        elif allows_extra:
            cleaned[key] = value
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.8)
            if close:
                report.warn(sub, f"not a key strato knows (kept for the provider); "
                                 f"did you mean {close[0]!r}?")
        else:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else \
                f"valid keys: {', '.join(fields)}"
            report.error(sub, f"unknown key; {hint}")
    return cleaned


LEGACY_HEAD_TYPE = "head"
LEGACY_WORKER_TYPE = "worker"


def _translate_legacy(data: dict[Any, Any], report: _Report) -> dict[Any, Any]:
    """Ray's legacy format (``head_node`` and ``worker_nodes`` are node_configs, the
    top-level ``min_workers``/``max_workers`` count workers) into node types, when
    ``available_node_types`` is absent; each translation is noted."""
    if "available_node_types" in data or not (
            isinstance(data.get("head_node"), dict) or isinstance(data.get("worker_nodes"),
                                                                  dict)):
        return data
    data = dict(data)
    types: dict[str, Any] = {}
    head = data.pop("head_node", None)
    if not isinstance(head, dict):
        report.error(("head_node",), "the legacy Ray format needs head_node (the head's "
                                     "node_config) beside worker_nodes")
        head = {}
    types[LEGACY_HEAD_TYPE] = {"node_config": head, "max_workers": 0}
    report.alias(("available_node_types", LEGACY_HEAD_TYPE, "node_config"), ("head_node",))
    report.alias(("available_node_types",), ("head_node",))
    report.alias(("head_node_type",), ("head_node",))
    report.note(("head_node",), f"legacy Ray key translated: node type {LEGACY_HEAD_TYPE!r} "
                                f"with this node_config, head_node_type: {LEGACY_HEAD_TYPE}")
    workers = data.pop("worker_nodes", None)
    lo = data.pop("min_workers", 0)
    if isinstance(workers, dict):
        hi = data.get("max_workers", DEFAULT_GLOBAL_MAX_WORKERS)
        types[LEGACY_WORKER_TYPE] = {"node_config": workers, "min_workers": lo,
                                     "max_workers": hi}
        where = ("available_node_types", LEGACY_WORKER_TYPE)
        report.alias((*where, "node_config"), ("worker_nodes",))
        report.alias((*where, "min_workers"), ("min_workers",))
        report.alias((*where, "max_workers"), ("max_workers",))
        report.alias(where, ("worker_nodes",))
        report.note(("worker_nodes",), f"legacy Ray key translated: node type "
                                       f"{LEGACY_WORKER_TYPE!r} with this node_config, "
                                       f"min_workers {lo} (from min_workers), max_workers "
                                       f"{hi} (from max_workers)")
    elif lo:
        report.warn(("min_workers",), "ignored: the legacy format has no worker_nodes")
    data["available_node_types"] = types
    data.setdefault("head_node_type", LEGACY_HEAD_TYPE)
    return data


def _apply_spot_idioms(data: dict[str, Any], report: _Report) -> None:
    """A node type whose node_config asks the cloud for spot capacity in the cloud's own
    words (as Ray's YAMLs do) is ``spot: true``; ``spot: false`` beside it is an error.
    Which keys mean spot is the provider class's to say (``spot_idiom``)."""
    provider = data.get("provider")
    provider_cls = _provider_class(provider.get("type") if isinstance(provider, dict)
                                   else None)
    types = data.get("available_node_types")
    if provider_cls is None or not isinstance(types, dict):
        return
    for name, nt in types.items():
        config = nt.get("node_config") if isinstance(nt, dict) else None
        idiom = provider_cls.spot_idiom(config) if isinstance(config, dict) else None
        if idiom is None:
            continue
        where = ("available_node_types", name)
        if nt.get("spot") is False:
            report.error((*where, "spot"), f"spot: false contradicts node_config."
                                           f"{idiom.text} (which asks for spot instances); "
                                           "remove one of them")
            continue
        if nt.get("spot") is True:
            continue
        nt["spot"] = True
        extra = ""
        if idiom.max_price is not None and nt.get("max_price") is None:
            nt["max_price"] = idiom.max_price
            extra = f", max_price {idiom.max_price:g}"
        report.note((*where, "node_config", *idiom.path),
                    f"asks the cloud for spot instances, so node type {name!r} is spot "
                    f"(spot: true{extra}): preemption notices, replacement, "
                    "fallback_to_on_demand and status apply")


def _check_nested(value: Any, annotation: Any, path: KeyPath, report: _Report) -> Any:
    """Recurse into sub-sections (``auth``) and mappings of them (node types)."""
    optional = [a for a in get_args(annotation) if a is not type(None)]
    if len(optional) == 1 and type(None) in get_args(annotation):  # X | None
        annotation = optional[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _check_keys(value, annotation, path, report) if isinstance(value, dict) \
            else value
    if get_origin(annotation) is dict and isinstance(value, dict):
        item = get_args(annotation)[1]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return {k: _check_keys(v, item, (*path, k), report) if isinstance(v, dict) else v
                    for k, v in value.items()}
    return value


def _check_semantics(raw: dict[str, Any], report: _Report) -> None:
    """Checks across keys; guarded so wrong types are left to the type check."""
    data = _fill_defaults(raw)
    provider = data.get("provider")
    provider = provider if isinstance(provider, dict) else {}
    ptype = provider.get("type")
    types = data.get("available_node_types")
    types = types if isinstance(types, dict) else {}
    head = data.get("head_node_type")

    if isinstance(ptype, str) and ptype not in PROVIDER_TYPES:
        close = difflib.get_close_matches(ptype, PROVIDER_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        report.error(("provider", "type"), f"unknown provider type {ptype!r}; expected one "
                                           f"of {', '.join(PROVIDER_TYPES)}{hint}")
    provider_cls = _provider_class(ptype)
    for problem in provider_cls.check_config(data) if provider_cls else ():
        (report.warn if problem.warning else report.error)(problem.path, problem.message)
    if data.get("autostop") not in (None, False) and provider_cls is not None and \
            not provider_cls.can_create_nodes:
        report.warn(("autostop",), f"ignored: provider type {ptype!r} claims existing hosts "
                                   "instead of creating machines, so there is nothing to stop")
    if isinstance(provider.get("monitor"), str) and provider["monitor"] == "off" and \
            data.get("autostop") not in (None, False):
        report.warn(("autostop",), "ignored: the monitor, which autostops, is off "
                                   "(provider.monitor: off)")

    name = data.get("cluster_name")
    if isinstance(name, str) and not _NAME_RE.match(name):
        report.error(("cluster_name",), f"{name!r}: use letters, digits, '-' or '_' "
                                        "(at most 63, starting with a letter or digit)")

    if "available_node_types" in data and not types and isinstance(
            data["available_node_types"], dict):
        report.error(("available_node_types",), "at least one node type is required")
    if isinstance(head, str) and types and head not in types:
        close = difflib.get_close_matches(head, [str(k) for k in types], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        report.error(("head_node_type",), f"{head!r} is not a key of available_node_types; "
                                          f"{hint}(known: {', '.join(map(str, types))})")

    total_min = 0
    for tname, nt in types.items():
        if not isinstance(nt, dict):
            continue
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers")
        if _is_int(lo) and _is_int(hi) and lo > hi:
            given = "" if "max_workers" in raw["available_node_types"][tname] else \
                (", the default for the head node type" if tname == head else
                 ", the default: the global max_workers")
            report.error(("available_node_types", tname, "min_workers"),
                         f"min_workers ({lo}) is greater than max_workers ({hi}{given})")
        if _is_int(lo):
            total_min += lo
        if nt.get("max_price") is not None and not nt.get("spot"):
            report.warn(("available_node_types", tname, "max_price"),
                        "ignored: the node type is not spot")
    _check_accelerators(data, types, report)
    gmax = data.get("max_workers")
    if _is_int(gmax) and total_min > gmax:
        report.warn(("max_workers",), f"the node types' min_workers add up to {total_min}, "
                                      f"more than max_workers ({gmax})")


_INSTANCE_TYPE_KEYS = ("InstanceType", "machineType")


def _check_accelerators(data: dict[str, Any], types: dict[Any, Any], report: _Report) -> None:
    """``accelerators`` / ``any_of``: well formed, instead of (not beside) an instance
    type, on a provider that prices nodes, and (where the region is known) available."""
    from strato.providers import provider_class

    provider = data.get("provider") if isinstance(data.get("provider"), dict) else {}
    ptype, region = provider.get("type"), provider.get("region")
    try:
        cloud = provider_class(ptype).catalog_cloud if isinstance(ptype, str) else None
    except ValueError:
        return  # an unknown provider type is reported elsewhere
    for tname, nt in types.items():
        if not isinstance(nt, dict) or not (nt.get("accelerators") or nt.get("any_of")):
            for key in ("cloud", "region"):
                if nt.get(key) if isinstance(nt, dict) else None:
                    report.warn(("available_node_types", tname, key),
                                "ignored without accelerators (node_config names the type)")
            continue
        path = ("available_node_types", tname)
        requests = []
        for key, parse in (("accelerators", parse_accelerators), ("any_of", parse_any_of)):
            if nt.get(key) is None:
                continue
            try:
                parsed = parse(nt[key])
            except ValueError as e:
                report.error((*path, key), str(e))
                continue
            requests = parsed if isinstance(parsed, list) else [parsed]
        if nt.get("accelerators") and nt.get("any_of"):
            report.error((*path, "any_of"), "give accelerators or any_of, not both")
        config = nt.get("node_config") if isinstance(nt.get("node_config"), dict) else {}
        for key in _INSTANCE_TYPE_KEYS:
            if config.get(key):
                report.error((*path, "node_config", key),
                             "names an instance type, but accelerators/any_of lets strato "
                             "choose it; drop one of them")
        if cloud is None:
            report.error((*path, "accelerators" if nt.get("accelerators") else "any_of"),
                         f"provider type {ptype!r} cannot choose instance types by GPU "
                         "(aws and gcp can)")
            continue
        if nt.get("cloud") not in (None, cloud):
            report.error((*path, "cloud"), f"{nt['cloud']!r}: the cluster's nodes are on "
                                           f"{cloud} (provider.type)")
        if nt.get("region") not in (None, region):
            report.error((*path, "region"), f"{nt['region']!r}: the provider's region is "
                                            f"{region!r}; node types live in that region")
        if requests and region:
            try:
                check_available(load_catalog(), requests, cloud, region)
            except CatalogError as e:
                report.error((*path, "accelerators" if nt.get("accelerators") else "any_of"),
                             str(e))


def _fill_defaults(data: dict[str, Any]) -> dict[str, Any]:
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
        provider_cls = _provider_class(provider.get("type") if isinstance(provider, dict)
                                       else None)
        default = provider_cls.default_ssh_user if provider_cls else None
        data["auth"] = {**auth, "ssh_user": default or _current_user()}
    return data


def _provider_class(ptype: Any) -> type[NodeProvider] | None:
    """The provider class of a ``provider.type`` value, None if it names none."""
    return provider_class(ptype) if isinstance(ptype, str) and ptype in PROVIDER_TYPES \
        else None


# ---------------------------------------------------------------- helpers
def _pydantic_message(err: Mapping[str, Any]) -> str:
    """Turn a pydantic error into words a YAML author knows."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    got = f" (got {_describe(value)})"
    if kind == "missing":
        if tuple(err["loc"]) == ("provider", "type"):
            return f"required key missing; one of {', '.join(PROVIDER_TYPES)}"
        return "required key missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping{got}"
    if kind == "list_type":
        return f"expected a list{got}"
    if kind.startswith("int_"):
        return f"expected an integer{got}"
    if kind.startswith("float_"):
        return f"expected a number{got}"
    if kind.startswith("bool_"):
        return f"expected true or false{got}"
    if kind.startswith("string_"):
        return f"expected a string{got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        bound = f"{bound:g}" if isinstance(bound, int | float) else bound
        return f"must be {op} {bound}{got}"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{msg}{got}"


def _format_path(path: KeyPath) -> str:
    if path == ("<yaml>",):
        return "(yaml)"
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "(top level)"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (some containers)
        return os.environ.get("USER", "root")


def _stable_hash(obj: Any) -> str:
    """sha1 of canonical JSON: 40 hex chars, fits in a GCP label value."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _digest_path(local: str, copy_filter: CopyFilter | None = None) -> str:
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
