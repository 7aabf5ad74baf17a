"""Ray's cluster-YAML idioms translated, each with a note: the legacy
``head_node``/``worker_nodes`` format, and a cloud's own spot settings in
``node_config`` (which keys mean spot is the provider class's ``spot_idiom``)."""

from __future__ import annotations

from typing import Any

from strato.launcher.config.models import DEFAULT_GLOBAL_MAX_WORKERS, provider_class_of
from strato.launcher.config.report import Report, describe

LEGACY_HEAD_TYPE = "head"
LEGACY_WORKER_TYPE = "worker"


def translate_legacy(data: dict[Any, Any], report: Report) -> dict[Any, Any]:
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
                                       f"min_workers {describe(lo)} (from min_workers), "
                                       f"max_workers {describe(hi)} (from max_workers)")
    elif lo:
        report.warn(("min_workers",), "ignored: the legacy format has no worker_nodes")
    data["available_node_types"] = types
    data.setdefault("head_node_type", LEGACY_HEAD_TYPE)
    return data


def apply_spot_idioms(data: dict[str, Any], report: Report) -> None:
    """A node type whose node_config asks the cloud for spot capacity in the cloud's own
    words (as Ray's YAMLs do) is ``spot: true``; ``spot: false`` beside it is an error.
    Which keys mean spot is the provider class's to say (``spot_idiom``)."""
    provider = data.get("provider")
    provider_cls = provider_class_of(provider.get("type") if isinstance(provider, dict)
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



