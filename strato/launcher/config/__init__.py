"""The cluster YAML: parsed with line numbers, validated into typed models.

Key names follow Ray's cluster YAML where the meaning is the same, so Ray users can bring
their files; strato adds spot fields per node type. Every problem is reported as
``FILE:LINE: key.path: message`` (all of them at once, in one ``ConfigError``); keys only
Ray needs become warnings on ``ClusterConfig.warnings`` instead of errors. What strato
translates from Ray's idioms (the legacy ``head_node``/``worker_nodes`` format, a cloud's
own spot settings in ``node_config``) is said on ``ClusterConfig.notes``, same format.

Package layout: ``models`` (the typed config), ``loading`` (parse and check),
``raycompat`` (Ray's idioms), ``report`` (where problems are and how they read).
"""

from strato.launcher.config.loading import load_config, load_config_from_dict
from strato.launcher.config.models import (
    AuthConfig,
    AutoscalerConfig,
    AutostopConfig,
    ClusterConfig,
    NodeTypeConfig,
    ProviderConfig,
)
from strato.providers import PROVIDER_TYPES

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
