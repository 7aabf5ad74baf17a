"""How the autoscaler loop asks the head: its nodes, demand and activity, and drains.

`RuntimeView` is the interface the loop is given (tests pass a stub); `HeadRuntime` is
the real one, through a `HeadClient` attached to the head node's own socket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from strato.exceptions import HeadUnreachableError, LauncherError
from strato.runtime.head_client import HeadClient

__all__ = ["HeadRuntime", "RuntimeView"]


class RuntimeView(Protocol):
    """What the loop asks the head: its nodes and demand, and drains."""

    def view(self) -> Mapping[str, Any] | None:
        """``{"nodes": HeadClient.nodes(), "demand": HeadClient.demand()}``, or None when
        the head cannot be reached (only then: any other error propagates)."""

    def drain(self, node_hex: str, reason: str) -> None:
        """Ask the head to stop placing work on a runtime node."""

    def activity(self) -> Mapping[str, Any] | None:
        """``HeadClient.activity()`` (whether anything is active, ``idle_seconds``), or
        None when the head cannot be reached: autostop judges idleness by it."""


class HeadRuntime:
    """The head's view through a ``HeadClient`` attached to the head node's runtime.

    The loop runs on the head or, for the local provider, on the same machine, so it
    attaches to the head node's own socket and never adds a node to the cluster. A lost
    connection drops the client; the next call reconnects (the head may restart, or move:
    ``temp_dir`` is asked again).
    """

    def __init__(self, temp_dir: Callable[[], str], token: str | None = None) -> None:
        self.temp_dir = temp_dir
        self.token = token  # unused on this machine (the node's socket); kept for callers
        self._client: HeadClient | None = None

    def _head(self) -> HeadClient:
        if self._client is None:
            try:
                temp_dir = self.temp_dir()
            except LauncherError as e:  # no head machine: nothing to attach to
                raise HeadUnreachableError(str(e)) from e
            self._client = HeadClient(temp_dir)
        return self._client

    def view(self) -> Mapping[str, Any] | None:
        try:
            head = self._head()
            return {"nodes": head.nodes(), "demand": head.demand()}
        except HeadUnreachableError:
            self.close()
            return None

    def drain(self, node_hex: str, reason: str) -> None:
        try:
            self._head().drain(node_hex, reason)
        except HeadUnreachableError:
            self.close()
            raise

    def activity(self) -> Mapping[str, Any] | None:
        try:
            return self._head().activity()
        except HeadUnreachableError:
            self.close()
            return None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
