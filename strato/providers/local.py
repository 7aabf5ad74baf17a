"""This machine as a node provider: every node is a runtime process with its own directory.

"Creating" a node only makes its directory ``$STRATO_HOME/local/<cluster>/<node_id>/``
(the node's runtime temp dir) and records it; the launcher then starts the runtime there
with its local command runner, exactly as it would over SSH. Records and tags live in
``$STRATO_HOME/local/<cluster>/nodes.json`` (0600, file-locked), so ``down`` from another
process sees what ``up`` made. Terminating stops the node's runtime by the pids in its
node files (never by process name) and removes its directory.

A node's state comes from its runtime: a live process -> running; node files whose
process is gone (it crashed or was killed) -> stopped, so the monitor replaces it;
nothing started yet -> pending.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from strato.exceptions import ProviderError
from strato.localfiles import strato_home
from strato.providers.base import TAG_CLUSTER, ConfigProblem, Node, NodeState, NodeTypeSpec
from strato.providers.records import RecordProvider

LOCAL_IP = "127.0.0.1"
# A node's unix socket is <temp_dir>/session/agent-xxxxxxxx.sock; Linux allows 107 bytes.
_SOCKET_SUFFIX = len("/session/agent-xxxxxxxx.sock")
_MAX_SOCKET_PATH = 107


class LocalProvider(RecordProvider):
    """Runtime processes on this machine, posing as the machines of one cluster."""

    nodes_on_this_machine = True

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[ConfigProblem]:
        provider = config.get("provider")
        if isinstance(provider, Mapping) and (provider.get("head_ip")
                                              or provider.get("worker_ips")):
            return [ConfigProblem(("provider", "type"), "head_ip/worker_ips are ignored by "
                                  "the 'local' provider (Ray's 'local' is strato's 'ssh')",
                                  warning=True)]
        return []

    def __init__(self, provider_config: Mapping[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.root = strato_home() / "local" / cluster_name
        self.state_path = self.root / "nodes.json"
        self.lock_path = self.root / "nodes.lock"

    # ------------------------------------------------------------ node directories
    def _temp_dir_for(self, node_id: str) -> Path:
        """The node's directory; a short one under /tmp when STRATO_HOME is too deep for
        the node's unix socket path."""
        path = self.root / node_id
        if len(str(path)) + _SOCKET_SUFFIX <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"strato-local-{digest}"

    @staticmethod
    def _runtime_state(temp_dir: str) -> NodeState:
        from strato.runtime.session import node_files  # lazy: psutil only when listing

        if node_files(temp_dir):
            return NodeState.RUNNING
        nodes_dir = Path(temp_dir, "nodes")
        if nodes_dir.is_dir() and any(nodes_dir.glob("*.json")):
            return NodeState.STOPPED  # node files left by a process that died
        return NodeState.PENDING

    def _node(self, node_id: str, record: Mapping[str, Any]) -> Node:
        return Node(id=node_id, state=self._runtime_state(record["temp_dir"]),
                    tags=dict(record.get("tags", {})), private_ip=LOCAL_IP, public_ip=None,
                    launch_time=record.get("launch_time"), instance_type="local",
                    spot=bool(record.get("spot", False)))

    # ------------------------------------------------------------ interface
    def create_nodes(self, spec: NodeTypeSpec, count: int, tags: Mapping[str, str], *,
                     zone: str | None = None, spot: bool | None = None) -> list[Node]:
        """Make ``count`` node directories; the launcher starts their runtimes."""
        if count <= 0:
            return []
        all_tags = {**tags, TAG_CLUSTER: self.cluster_name}
        made = []
        with self._state(write=True) as state:
            for _ in range(count):
                node_id = "local-" + secrets.token_hex(4)
                while node_id in state["nodes"]:
                    node_id = "local-" + secrets.token_hex(4)
                temp_dir = self._temp_dir_for(node_id)
                temp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                state["nodes"][node_id] = {"tags": dict(all_tags), "launch_time": time.time(),
                                           "temp_dir": str(temp_dir),
                                           "spot": bool(spec.spot if spot is None else spot)}
                made.append(node_id)
            return [self._node(i, state["nodes"][i]) for i in made]

    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Stop each node's runtime (by pid) and remove its directory; unknown ids ignored."""
        from strato.runtime.control import stop_nodes

        with self._state(write=True) as state:
            records = [state["nodes"].pop(i) for i in node_ids if i in state["nodes"]]
        def stop(record: Mapping[str, Any]) -> None:
            stop_nodes(record["temp_dir"])
            shutil.rmtree(record["temp_dir"], ignore_errors=True)

        if records:  # in parallel: each stop waits for its processes to exit
            with ThreadPoolExecutor(min(16, len(records))) as pool:
                list(pool.map(stop, records))

    def internal_address(self, node: Node) -> str:
        return LOCAL_IP

    def ssh_address(self, node: Node) -> str:
        return LOCAL_IP

    # ------------------------------------------------------------ local extras
    def local_dir(self, node_id: str) -> Path:
        """The node's directory (its runtime's ``--temp-dir``)."""
        with self._state() as state:
            record = state["nodes"].get(node_id)
        if record is None:
            raise ProviderError(f"local provider: no node {node_id} in cluster "
                                f"{self.cluster_name!r}")
        return Path(record["temp_dir"])

    def cleanup(self) -> None:
        """Remove the cluster's directory once it has no nodes (``down`` calls this)."""
        if self.list_nodes():
            return
        shutil.rmtree(self.root, ignore_errors=True)


PROVIDER = LocalProvider
