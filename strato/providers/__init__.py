"""Where nodes come from: one module per provider, all behind ``base.NodeProvider``."""

from __future__ import annotations

import importlib

from strato.providers.base import NodeProvider

# The registry: provider type (``provider.type`` in the cluster YAML) -> its module.
_MODULES = {"aws": "strato.providers.aws", "gcp": "strato.providers.gcp",
            "ssh": "strato.providers.ssh", "local": "strato.providers.local"}
PROVIDER_TYPES = tuple(_MODULES)


def provider_class(kind: str) -> type[NodeProvider]:
    """Import the provider module lazily, so one cloud's SDK is never needed for another."""
    try:
        module = importlib.import_module(_MODULES[kind])
    except KeyError:
        raise ValueError(f"unknown provider type {kind!r}; expected one of {sorted(_MODULES)}") from None
    return module.PROVIDER
