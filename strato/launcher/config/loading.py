"""Loading a cluster config: parse with lines, drop Ray-only keys (warnings), refuse
unknown ones (errors with a suggestion), translate Ray's idioms, check across keys,
then validate into ``ClusterConfig``; every problem at once in one ``ConfigError``."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import (
    BaseModel,
    ValidationError,
)

from strato.catalog import (
    CatalogError,
    check_available,
    load_catalog,
    parse_accelerators,
    parse_any_of,
)
from strato.exceptions import ConfigError
from strato.launcher.config.models import (
    NAME_RE,
    ClusterConfig,
    fill_defaults,
    provider_class_of,
)
from strato.launcher.config.raycompat import apply_spot_idioms, translate_legacy
from strato.launcher.config.report import (
    KeyPath,
    Report,
    describe,
    is_int,
    parse_yaml,
    pydantic_message,
)
from strato.providers import PROVIDER_TYPES, provider_class


# ---------------------------------------------------------------- loading
def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read, parse and validate a cluster YAML file; ``ConfigError`` lists every problem."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{source}: cannot read cluster config: {e.strerror or e}") from None
    data, lines, problems = parse_yaml(text)
    return _build(data, source, lines, problems)


def load_config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> ClusterConfig:
    """Validate an already-parsed config (no line numbers in messages)."""
    return _build(data, source, None, [])


def _build(data: Any, source: str, lines: dict[KeyPath, int] | None,
           problems: list[tuple[KeyPath, str]]) -> ClusterConfig:
    report = Report(source, lines)
    for path, msg in problems:
        report.error(path, msg)
    if report.errors:  # YAML syntax: nothing else to check
        raise report.config_error()
    if data is None:
        report.error((), "the file is empty; expected a mapping with provider, "
                         "available_node_types and head_node_type")
        raise report.config_error()
    if not isinstance(data, Mapping):
        report.error((), f"the top level must be a mapping of keys, got {describe(data)}")
        raise report.config_error()

    data = translate_legacy(dict(data), report)
    cleaned = _check_keys(data, ClusterConfig, (), report)
    apply_spot_idioms(cleaned, report)
    _check_semantics(cleaned, report)
    try:
        config = ClusterConfig.model_validate(cleaned)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            report.error(tuple(err["loc"]), pydantic_message(err))
        config = None
    if report.errors or config is None:
        raise report.config_error()
    config._warnings = report.sorted(report.warnings)
    config._notes = report.sorted(report.notes)
    config._source = source
    return config


# ---------------------------------------------------------------- checks
def _check_keys(data: dict[Any, Any], model: type[BaseModel], path: KeyPath,
                report: Report) -> dict[str, Any]:
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
            report.error(sub, f"keys must be strings, got {describe(key)}")
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


def _check_nested(value: Any, annotation: Any, path: KeyPath, report: Report) -> Any:
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


def _check_semantics(raw: dict[str, Any], report: Report) -> None:
    """Checks across keys; guarded so wrong types are left to the type check."""
    data = fill_defaults(raw)
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
    provider_cls = provider_class_of(ptype)
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
    if isinstance(name, str) and not NAME_RE.match(name):
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
        if is_int(lo) and is_int(hi) and lo > hi:
            given = "" if "max_workers" in raw["available_node_types"][tname] else \
                (", the default for the head node type" if tname == head else
                 ", the default: the global max_workers")
            report.error(("available_node_types", tname, "min_workers"),
                         f"min_workers ({lo}) is greater than max_workers ({hi}{given})")
        if is_int(lo):
            total_min += lo
        if nt.get("max_price") is not None and not nt.get("spot"):
            report.warn(("available_node_types", tname, "max_price"),
                        "ignored: the node type is not spot")
    _check_accelerators(data, types, report)
    gmax = data.get("max_workers")
    if is_int(gmax) and total_min > gmax:
        report.warn(("max_workers",), f"the node types' min_workers add up to {total_min}, "
                                      f"more than max_workers ({gmax})")


_INSTANCE_TYPE_KEYS = ("InstanceType", "machineType")


def _check_accelerators(data: dict[str, Any], types: dict[Any, Any], report: Report) -> None:
    """``accelerators`` / ``any_of``: well formed, instead of (not beside) an instance
    type, on a provider that prices nodes, and (where the region is known) available."""

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


