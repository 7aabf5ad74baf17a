"""The Compute REST API as the GCE provider calls it: the client factory (the only place
``google.cloud.compute_v1`` is imported), operation waiting, and GCE's errors read as
capacity codes.

With ``provider.api_endpoint`` set every client talks REST to that endpoint (anonymous
credentials unless ``credentials_file`` is given), which is how tests point them at a
local fake. Operations are polled with our own operations clients: ``operation.result()``
builds an internal client that ignores the endpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strato.exceptions import ProviderError

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


def api_errors() -> Any:
    """``google.api_core.exceptions``, imported lazily like the clients."""
    from google.api_core import exceptions

    return exceptions


def capacity_code(text: str) -> str | None:
    """The capacity code an error text amounts to, or None if it is not about capacity."""
    for marker, code in CAPACITY_MARKERS:
        if marker.lower() in text.lower():
            return code
    return None


def http_error_text(exc: Exception) -> str:
    """Reasons and message of a google.api_core error, as one searchable line."""
    reasons = [str(e.get("reason", "")) for e in getattr(exc, "errors", None) or []
               if isinstance(e, Mapping)]
    reasons.append(str(getattr(exc, "reason", None) or ""))
    return " ".join([r for r in reasons if r] + [str(getattr(exc, "message", "") or exc)])


@dataclass
class Failure:
    """One failed insert: code (GCE's, e.g. ZONE_RESOURCE_POOL_EXHAUSTED) and message."""

    code: str
    message: str

    @property
    def capacity(self) -> str | None:
        return capacity_code(f"{self.code} {self.message}")


def wait_operation(clients: GCPClients, project: str, operation: Any, zone: str | None,
                   timeout: float) -> Any:
    """Poll a zone (or global) operation until DONE with our own endpoint-aware client."""
    done = clients.compute.Operation.Status.DONE
    deadline = time.monotonic() + timeout
    while operation.status != done:
        if time.monotonic() > deadline:
            raise ProviderError(f"GCE operation {operation.name} not done after "
                                f"{timeout:.0f}s")
        if zone:
            operation = clients.zone_operations.wait(
                project=project, zone=zone, operation=operation.name)
        else:
            operation = clients.global_operations.wait(
                project=project, operation=operation.name)
    return operation


def operation_failure(operation: Any) -> Failure | None:
    """The error a DONE operation ended with, or None if it succeeded."""
    errors = list(operation.error.errors) if "error" in operation else []
    if not errors:
        return None
    return Failure(code=errors[0].code,
                   message="; ".join(e.message or e.code for e in errors))
