"""Google Compute Engine node provider: firewall rules, on-demand and spot instances.

``google.cloud.compute_v1`` is imported only inside ``api.make_clients``, so users of
other clouds never need it. The package, by concern:

- ``provider.py``: ``GCPProvider`` itself: its state, config checks, catalogue, resources;
- ``launch.py``: ``prepare`` (SSH key, firewall rules) and ``create_nodes`` (the insert
  body: ``ssh-keys`` metadata, spot scheduling, the head's service account);
- ``instances.py``: listing (preemptions included), delete, stop/start, labels;
- ``api.py``: the client factory, operation waiting, errors read as capacity codes;
- ``names.py``: labels, resource names, machine shapes, accelerator names (no API calls).

The head's credentials: the head VM is created with a service account and the compute
scope (``serviceAccounts``), so the monitor beside it calls Compute as that account:
``provider.service_account`` (an email) if set, else the project's default compute
service account. Creating a dedicated account needs the IAM API, which strato does not
call. Only with ``provider.head_credentials`` (set by the launcher: true where the
monitor runs on the head).
"""

from __future__ import annotations

from strato.providers.gcp.api import CAPACITY_MARKERS, GCPClients, capacity_code, make_clients
from strato.providers.gcp.instances import PREEMPTED_OPERATION
from strato.providers.gcp.launch import (
    COMPUTE_SCOPE,
    COMPUTE_URL,
    DEFAULT_DISK_GB,
    DEFAULT_GPU_IMAGE,
    DEFAULT_IMAGE,
    DEFAULT_NETWORK,
)
from strato.providers.gcp.names import (
    ACCELERATOR_NAMES,
    accelerator_name,
    cluster_prefix,
    label_key,
    label_value,
    machine_shape,
    resource_name,
)
from strato.providers.gcp.provider import MEMORY_FRACTION, GCPProvider

PROVIDER = GCPProvider

__all__ = [
    "ACCELERATOR_NAMES", "CAPACITY_MARKERS", "COMPUTE_SCOPE", "COMPUTE_URL", "DEFAULT_DISK_GB",
    "DEFAULT_GPU_IMAGE", "DEFAULT_IMAGE", "DEFAULT_NETWORK", "MEMORY_FRACTION",
    "PREEMPTED_OPERATION", "PROVIDER", "GCPClients", "GCPProvider", "accelerator_name",
    "capacity_code", "cluster_prefix", "label_key", "label_value", "machine_shape",
    "make_clients", "resource_name",
]
