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
    MAX_DEPTH,
    MAX_EXPANDED,
    KeyPath,
    Report,
    describe,
    format_path,
    is_int,
    parse_yaml,
    pydantic_message,
)
from strato.providers import PROVIDER_TYPES, provider_class

MAX_FILE_BYTES = 1 << 20  # a cluster YAML is a few KB; a bigger file is the wrong file


# ---------------------------------------------------------------- loading
def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read, parse and validate a cluster YAML file; ``ConfigError`` lists every problem."""
    source = os.fspath(path)
    try:
        with Path(source).open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read cluster config: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB; a cluster "
                          "config is a few KB (is it the right file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                          f"column {column} ({e.reason}); save the file as UTF-8") from None
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
    _check_plain(data, report)
    if report.errors:  # the shape is wrong: checks of meaning would only add noise
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
def _close(word: str, options: list[str], cutoff: float = 0.6) -> str | None:
    """The option ``word`` was probably meant to be (a typo), if any."""
    if len(word) > 64:  # a long value is no typo of a short name, and costs time
        return None
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return close[0] if close else None


def _check_plain(data: Mapping[Any, Any], report: Report) -> None:
    """Plain data, as JSON and the clouds' APIs take it: string keys everywhere (YAML
    makes ``1:``, ``on:`` or ``null:`` something else), no binary values or sets; bounded
    (a dict may come from elsewhere than ``parse_yaml``, which bounds what it reads)."""
    stack: list[tuple[KeyPath, Any]] = [((), data)]
    visits = 0
    while stack:
        path, value = stack.pop()
        visits += 1
        if visits > MAX_EXPANDED:
            report.error((), f"more than {MAX_EXPANDED} values; a cluster config has a few "
                             "hundred")
            return
        if len(path) > 2 * MAX_DEPTH:
            report.error(path[:3], f"nested deeper than {2 * MAX_DEPTH} levels")
            return
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    report.error((*path, key), f"keys must be strings, got {describe(key)} "
                                               "(quote it to make it one)")
                stack.append(((*path, key), item))
        elif isinstance(value, list | tuple):
            stack.extend(((*path, i), item) for i, item in enumerate(value))
        elif isinstance(value, set | frozenset):  # unordered: setup would run in any order
            report.error(path, "a set (!!set) is not allowed; write a list")
        elif isinstance(value, bytes | bytearray):
            report.error(path, "binary data (!!binary) is not allowed; a cluster config "
                               "is text")


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
        if not isinstance(key, str):  # refused by _check_plain; kept for direct callers
            report.error(sub, f"keys must be strings, got {describe(key)}")
        elif key in fields:
            if value is None and not fields[key].is_required():
                continue
            cleaned[key] = _check_nested(value, fields[key].annotation, sub, report)
        elif key in ray_only:
            report.warn(sub, f"Ray-only key, ignored by strato ({ray_only[key]})")
        elif allows_extra:
            cleaned[key] = value
            close = _close(key, list(fields), cutoff=0.8)
            if close:
                report.warn(sub, f"not a key strato knows (kept for the provider); "
                                 f"did you mean {close!r}?")
        else:
            close = _close(key, list(fields))
            hint = f"did you mean {close!r}?" if close else \
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
        close = _close(ptype, PROVIDER_TYPES)
        hint = f"; did you mean {close!r}?" if close else ""
        report.error(("provider", "type"), f"unknown provider type {describe(ptype)}; "
                                           f"expected one of {', '.join(PROVIDER_TYPES)}{hint}")
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
        report.error(("cluster_name",), f"{describe(name)}: use letters, digits, '-' or '_' "
                                        "(at most 63, starting with a letter or digit)")

    if "available_node_types" in data and not types and isinstance(
            data["available_node_types"], dict):
        report.error(("available_node_types",), "at least one node type is required")
    if isinstance(head, str) and types and head not in types:
        close = _close(head, [str(k) for k in types])
        hint = f"did you mean {close!r}? " if close else ""
        known = ", ".join(describe(k) if not isinstance(k, str) else format_path((k,))
                          for k in types)
        report.error(("head_node_type",), f"{describe(head)} is not a key of "
                                          f"available_node_types; {hint}(known: {known})")

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
                         f"min_workers ({describe(lo)}) is greater than max_workers "
                         f"({describe(hi)}{given})")
        if is_int(lo):
            total_min += lo
        if nt.get("max_price") is not None and not nt.get("spot"):
            report.warn(("available_node_types", tname, "max_price"),
                        "ignored: the node type is not spot")
    _check_accelerators(data, types, report)
    gmax = data.get("max_workers")
    if is_int(gmax) and total_min > gmax:
        report.warn(("max_workers",), f"the node types' min_workers add up to "
                                      f"{describe(total_min)}, more than max_workers "
                                      f"({describe(gmax)})")


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
                         f"provider type {describe(ptype)} cannot choose instance types by GPU "
                         "(aws and gcp can)")
            continue
        if nt.get("cloud") not in (None, cloud):
            report.error((*path, "cloud"), f"{describe(nt['cloud'])}: the cluster's nodes "
                                           f"are on {cloud} (provider.type)")
        if nt.get("region") not in (None, region):
            report.error((*path, "region"), f"{describe(nt['region'])}: the provider's "
                                            f"region is {describe(region)}; node types live "
                                            "in that region")
        if requests and region:
            try:
                check_available(load_catalog(), requests, cloud, region)
            except CatalogError as e:
                report.error((*path, "accelerators" if nt.get("accelerators") else "any_of"),
                             str(e))


