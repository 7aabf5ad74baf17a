"""Providers whose nodes are records in a locked JSON file on this machine (local runtime
processes, claimed SSH hosts): listing and tagging work the same for both."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strato.exceptions import ProviderError
from strato.localfiles import locked_json
from strato.providers.base import Node, NodeProvider


class RecordProvider(NodeProvider):
    """Subclasses set ``state_path`` and ``lock_path`` and say how a record becomes a Node."""

    state_path: Path
    lock_path: Path

    def _state(self, write: bool = False):
        """The records file, under an exclusive lock; written back atomically when ``write``."""
        return locked_json(self.state_path, self.lock_path, write)

    @abc.abstractmethod
    def _node(self, node_id: str, record: Mapping[str, Any]) -> Node:
        """The provider's view of one record."""

    def list_nodes(self, tag_filters: Mapping[str, str] | None = None, *,
                   include_terminated: bool = False) -> list[Node]:
        """Recorded nodes whose tags match; released ones are simply gone."""
        if not self.state_path.exists():
            return []
        with self._state() as state:
            nodes = [self._node(i, rec) for i, rec in state["nodes"].items()]
        wanted = dict(tag_filters or {})
        return [n for n in nodes if all(n.tags.get(k) == v for k, v in wanted.items())]

    def set_tags(self, node_id: str, tags: Mapping[str, str]) -> None:
        with self._state(write=True) as state:
            record = state["nodes"].get(node_id)
            if record is None:
                raise ProviderError(f"{type(self).__name__}: no node {node_id} in cluster "
                                    f"{self.cluster_name!r}")
            record["tags"].update(tags)
