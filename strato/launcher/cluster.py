"""One cluster as the launcher sees it: config + provider + runners + where things live.

Shared by ``up``/``down`` (``reconcile.py``), the everyday commands (``commands.py``) and
the monitor that runs beside the head (``monitor.py``), so all find nodes, reach them and
start runtimes the same way.
Nodes are always found through the provider's tags, never from local memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strato.exceptions import LauncherError, OwnerConflictError
from strato.launcher.bootstrap import TAG_NODE_ID_LABEL, render, venv_dir
from strato.launcher.config import ClusterConfig, load_config
from strato.launcher.console import say
from strato.launcher.pricing import Pricing
from strato.launcher.runner import (
    CommandRunner,
    LocalRunner,
    OutputSink,
    SSHRunner,
    print_plain,
    shell_path,
)
from strato.launcher.state import StateDB
from strato.localfiles import OWNER_FILE, owner_id, strato_home
from strato.providers import provider_class
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    TAG_LAUNCH_HASH,
    TAG_NAME,
    TAG_NODE_TYPE,
    TAG_OWNER,
    TAG_STATUS,
    Node,
    NodeKind,
    NodeProvider,
    NodeStatus,
)
from strato.runtime.session import user_temp_dir
from strato.ssh import SSHTarget, pinned_hosts_path

__all__ = ["DEFAULT_HEAD_PORT", "TAG_NODE_ID_LABEL", "Cluster", "open_cluster"]

DEFAULT_HEAD_PORT = 6380
MONITOR_MODES = ("head", "local", "off")


class Cluster:
    """A cluster config bound to its provider, local state and command runners."""

    def __init__(self, config: ClusterConfig, *, state: StateDB | None = None,
                 provider: NodeProvider | None = None, echo: bool = True,
                 overrides: Mapping[str, Any] | None = None):
        self.config = config
        self.name = config.cluster_name
        self.kind = config.provider.type
        self.state = state or StateDB()
        self.echo = echo
        # Set by the monitor: hashes, key and wheel paths as the launcher computed them.
        self.overrides = dict(overrides or {})
        #: whose nodes these are (tag TAG_OWNER); the monitor gets the launcher's in its spec
        self.owner: str = self.overrides.get("owner") or owner_id()
        self._adopts_untagged: bool | None = None
        self._facts: dict[str, Any] = {}
        # what the provider is (class facts) is known before the provider is built
        self.provider_type = type(provider) if provider is not None else \
            provider_class(self.kind)
        self.provider = provider or self.provider_type(self.provider_config(), self.name)
        # The monitor gets them in its spec: nodes it creates carry the key `up` chose.
        self.facts = self.overrides.get("facts") or {}
        self.token: str | None = None

    @property
    def facts(self) -> dict[str, Any]:
        """What the provider's ``prepare`` returned (key path, SSH user and key, ...)."""
        return self._facts

    @facts.setter
    def facts(self, value: Mapping[str, Any]) -> None:
        """Remember ``prepare``'s facts and hand them to the provider (``adopt_facts``)."""
        self._facts = dict(value or {})
        self.provider.adopt_facts(self._facts)

    # ------------------------------------------------------------ provider
    def provider_config(self) -> dict[str, Any]:
        """The ``provider:`` section plus what the launcher decides for the provider."""
        pc = self.config.provider.model_dump(exclude_none=True)
        pc.update(self.config.provider.extras)
        pc.setdefault("owner", self.overrides.get("owner") or owner_id())
        # cloud credentials of the head's own (instance profile, service account): only
        # where the monitor runs on the head
        pc.setdefault("head_credentials", self.monitor_mode == "head")
        if self.provider_type.stops_strato_on_terminate:
            auth = self.config.auth
            pc.setdefault("ssh_user", auth.ssh_user)
            if auth.ssh_private_key:
                pc.setdefault("ssh_private_key", self.overrides.get("key_path")
                              or auth.ssh_private_key)
            pc.setdefault("ssh_port", auth.ssh_port)
            pc.setdefault("stop_command", self.stop_node_script())
        return pc

    def prepare(self) -> None:
        """One-time provider resources (key pair, firewall); remembers the key path."""
        self.facts = dict(self.provider.prepare(self.config.to_dict()) or {})

    @property
    def is_local(self) -> bool:
        """Whether the nodes are processes on this machine (reached without SSH)."""
        return self.provider_type.nodes_on_this_machine

    @property
    def monitor_mode(self) -> str:
        """Where the monitor runs: ``head`` (beside the head service), ``local`` (this
        machine) or ``off``; from env ``STRATO_MONITOR`` or ``provider.monitor``."""
        mode = os.environ.get("STRATO_MONITOR") or self.config.provider.monitor
        if not mode:
            mode = "local" if self.is_local else "head"
        if mode not in MONITOR_MODES:
            raise LauncherError(f"provider.monitor / STRATO_MONITOR: {mode!r} is not one of "
                                f"{', '.join(MONITOR_MODES)}")
        return "local" if self.is_local and mode == "head" else mode

    @property
    def head_port(self) -> int:
        if self.is_local:
            return 0  # any free port: several local clusters may run side by side
        return self.config.provider.head_port

    # ------------------------------------------------------------ hashes
    def config_hash(self) -> str:
        """The whole config's hash, as ``up`` records it (a changed config: up again)."""
        text = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    def launch_hash(self, node_type: str) -> str:
        return self.overrides.get("launch_hash", {}).get(node_type) or \
            self.config.launch_hash(node_type)

    def setup_hash(self, node_type: str, *, head: bool) -> str:
        key = f"{'head' if head else 'worker'}:{node_type}"
        return self.overrides.get("setup_hash", {}).get(key) or \
            self.config.setup_hash(node_type, head=head)

    # ------------------------------------------------------------ nodes
    def owns(self, node: Node) -> bool:
        """Whether ``node`` is this owner's. A node from before owner tags counts as ours
        only where this ``$STRATO_HOME`` remembers the cluster (``up`` then tags it)."""
        tag = node.tags.get(TAG_OWNER)
        if tag:
            return tag == self.owner
        if self._adopts_untagged is None:
            self._adopts_untagged = self.state.get(self.name) is not None
        return self._adopts_untagged

    def machines(self, tags: Mapping[str, str] | None = None, *,
                 include_terminated: bool = False) -> list[Node]:
        """The provider's listing of this owner's nodes of the cluster matching ``tags``."""
        found = self.provider.list_nodes({**(tags or {}), TAG_CLUSTER: self.name},
                                         include_terminated=include_terminated)
        return [n for n in found if self.owns(n)]

    def nodes(self, *, kind: str | None = None, node_type: str | None = None,
              alive_only: bool = True) -> list[Node]:
        """This owner's nodes of the cluster, found by tags, oldest first."""
        tags = {}
        if kind:
            tags[TAG_KIND] = kind
        if node_type:
            tags[TAG_NODE_TYPE] = node_type
        found = self.machines(tags)
        if alive_only:
            found = [n for n in found if n.is_alive]
        return sorted(found, key=lambda n: (n.launch_time or 0.0, n.id))

    def foreign_nodes(self) -> list[Node]:
        """Live nodes with this cluster's name that belong to another owner."""
        return [n for n in self.provider.list_nodes({TAG_CLUSTER: self.name})
                if n.is_alive and not self.owns(n)]

    def owner_conflict(self, foreign: Sequence[Node], action: str,
                       force_does: str) -> OwnerConflictError:
        """The error ``up``/``down`` raise when another owner's nodes carry this name."""
        owners = sorted({n.tags.get(TAG_OWNER) or "(no owner tag)" for n in foreign})
        return OwnerConflictError(
            f"cluster {self.name!r} ({self.kind}): {len(foreign)} node(s) with this name "
            f"belong to another owner: {', '.join(owners)} ({', '.join(n.id for n in foreign)}); "
            f"you are {self.owner} ({strato_home() / OWNER_FILE}). Refusing to {action}: "
            "the same cluster_name in one account would make the two clusters manage each "
            f"other's nodes. Use another cluster_name, or pass --force to {force_does}.")

    def head(self) -> Node | None:
        heads = self.nodes(kind=NodeKind.HEAD.value)
        return heads[0] if heads else None

    def require_head(self) -> Node:
        head = self.head()
        if head is None:
            theirs = [n for n in self.foreign_nodes() if n.kind == NodeKind.HEAD.value]
            other = (f" (a head of another owner, {theirs[0].tags.get(TAG_OWNER) or '?'}, "
                     "has this cluster name)") if theirs else ""
            raise LauncherError(f"cluster {self.name!r} has no head node{other}; run "
                                "`strato up` first")
        return head

    def new_tags(self, kind: str, node_type: str) -> dict[str, str]:
        """Tags of a node about to be created (``up`` and the autoscaler alike)."""
        return {TAG_KIND: kind, TAG_NODE_TYPE: node_type, TAG_OWNER: self.owner,
                TAG_LAUNCH_HASH: self.launch_hash(node_type),
                TAG_STATUS: NodeStatus.PENDING.value, TAG_NAME: f"strato-{self.name}-{kind}"}

    def launch_hash_current(self, node: Node) -> bool:
        """Whether the machine still matches its node type's config (False: type removed)."""
        if node.node_type not in self.config.available_node_types:
            return False
        return node.tags.get(TAG_LAUNCH_HASH) == self.launch_hash(node.node_type)

    def find_nodes(self, which: str) -> list[Node]:
        """``head``, ``all``, or the nodes whose IP or id is ``which``."""
        if which == "head":
            return [self.require_head()]
        nodes = self.nodes()
        if which == "all":
            if not nodes:
                raise LauncherError(f"cluster {self.name!r} has no nodes; run `strato up` first")
            head = [n for n in nodes if n.kind == NodeKind.HEAD.value]
            return head + [n for n in nodes if n.kind != NodeKind.HEAD.value]
        hits = [n for n in nodes if which in (n.id, n.private_ip, n.public_ip)]
        if not hits:
            known = ", ".join(self.label(n) for n in nodes) or "none"
            raise LauncherError(f"no node {which!r} in cluster {self.name!r} (nodes: {known})")
        return hits

    def label(self, node: Node) -> str:
        """How output lines and messages name a node: ``head:10.0.0.2``."""
        where = node.id if self.is_local else (node.private_ip or node.public_ip or node.id)
        return f"{node.kind or 'node'}:{where}"

    # ------------------------------------------------------------ reaching nodes
    def key_path(self) -> str | None:
        return self.overrides.get("key_path") or self.config.auth.ssh_private_key or \
            self.facts.get("private_key_path")

    def runner(self, node: Node, *, echo: bool | None = None,
               connect_timeout: float | None = None, plain: bool = False) -> CommandRunner:
        """A command runner for ``node`` (SSH, or local when nodes are on this machine).

        Echoed output lines are prefixed with the node's label, or with ``plain`` printed
        as they are (for output a user redirects: ``strato exec c.yaml "cat f" > f``).
        """
        label = self.label(node)
        sink = OutputSink(label, self.state.log_dir(self.name) / f"{node.id}.log",
                          secrets=[self.token] if self.token else [],
                          echo=self.echo if echo is None else echo,
                          console_print=print_plain if plain else None)
        if self.is_local:
            temp_dir = self.provider.local_dir(node.id)
            return LocalRunner(label, temp_dir, sink, env={"STRATO_TEMP_DIR": str(temp_dir)})
        user = self.ssh_user()
        target = SSHTarget(host=self.provider.ssh_address(node), port=self.config.auth.ssh_port,
                           user=user, key_path=self.key_path(), name=label, node_id=node.id,
                           known_hosts=str(self.host_keys_path()),
                           user_known_hosts=self.provider.user_known_hosts_file)
        return SSHRunner(target, sink, connect_timeout=connect_timeout)

    def ssh_user(self) -> str:
        """The login user on the nodes."""
        return self.overrides.get("ssh_user") or self.facts.get("ssh_user") or \
            self.config.auth.ssh_user

    def host_keys_path(self) -> Path:
        """Where this cluster's nodes' SSH host keys are pinned (``down`` forgets them)."""
        return pinned_hosts_path(self.name)

    def local_runner(self, name: str, workdir: Path) -> LocalRunner:
        """A runner for this machine (the monitor when it runs locally)."""
        sink = OutputSink(name, self.state.log_dir(self.name) / f"{name}.log",
                          secrets=[self.token] if self.token else [], echo=self.echo)
        return LocalRunner(name, workdir, sink)

    # ------------------------------------------------------------ paths on nodes
    def runtime_python(self, node_type: str) -> str:
        """The node's Python for strato as a shell word: runtime_python, or the venv the
        launcher installs (this machine's Python for the local provider)."""
        configured = self.config.runtime_python_for(node_type)
        if configured:
            return shell_path(configured)
        if self.is_local:
            return shlex.quote(sys.executable)
        return shell_path((self.overrides.get("venv") or venv_dir()) + "/bin/python")

    def temp_dir_path(self, node: Node) -> str:
        """The node's runtime temp dir (its node files, sockets and logs)."""
        if self.is_local:
            return str(self.provider.local_dir(node.id))
        return user_temp_dir(self.ssh_user())  # the login user's own, as on any machine

    def temp_dir(self, node: Node) -> str:
        """The node's runtime temp dir as a shell word."""
        return shlex.quote(self.temp_dir_path(node))

    def scratch_dir(self, node: Node) -> str:
        """A directory on the node for launcher files (submitted scripts, monitor), raw path."""
        if self.is_local:
            return str(self.provider.local_dir(node.id))
        return f"/tmp/strato-{self.name}"

    def monitor_dir(self, head: Node | None) -> str:
        """Where the monitor keeps its spec, pid file and log (on the head, or here)."""
        if self.monitor_mode == "head" and head is not None:
            return self.scratch_dir(head) + "/monitor"
        path = self.state.home / "monitor" / self.name
        return str(path)

    def stop_node_script(self) -> str:
        """What terminating an SSH host runs there: stop the monitor and the runtime."""
        pythons = []
        for name in self.config.available_node_types:
            py = self.runtime_python(name)
            if py not in pythons:
                pythons.append(py)
        pythons.append('"$HOME"/.strato/venv-*/bin/python')  # installed by another version
        scratch = f"/tmp/strato-{self.name}"
        return render(
            "stop_node.sh",
            stop_monitor=render("stop_monitor.sh",
                                         pid_file=shlex.quote(scratch + "/monitor/monitor.pid")),
            pythons=" ".join(pythons), temp_dir=shlex.quote(user_temp_dir(self.ssh_user())),
            cleanup_dirs=shlex.quote(scratch))

    # ------------------------------------------------------------ runtime
    def env(self, head_address: str | None) -> dict[str, str]:
        """Environment for commands that should reach the cluster (exec, submit).

        The address only, never the cluster token: every node runs an agent, and
        ``init()`` attaches to it through its unix socket (found by the address in the
        node's runtime dir), so user commands never see the secret that lets a machine
        join the cluster."""
        return {"STRATO_ADDRESS": head_address} if head_address else {}

    def record_costs(self, nodes: Sequence[Node], ended: float | None = None) -> None:
        """Remember nodes in the cost history (``cost-report``); never fails the command."""
        if not nodes:
            return
        try:
            pricing = Pricing(self.config, self.provider)
            now = time.time()
            self.state.record_nodes([pricing.cost_record(n, now, ended) for n in nodes])
        except Exception as e:  # bookkeeping only
            say(f"[yellow]could not record node costs: {e}[/]")

    def head_address(self, head: Node) -> str:
        """The head service address: remembered by ``up``, else asked from the head."""
        record = self.state.get(self.name)
        if record and record.head_address:
            return record.head_address
        info = self.runtime_info(head)
        if not info:
            raise LauncherError(f"cluster {self.name!r}: the head's runtime is not running; "
                                "run `strato up` (or `strato up --restart-only`)")
        return info["head_address"]

    def runtime_info(self, head: Node, *, timeout: float = 30.0) -> dict[str, Any] | None:
        """What the head service knows (nodes, demand), or None if it cannot be asked."""
        runner = self.runner(head, echo=False)
        cmd = (f"{self.runtime_python(head.node_type or '')} -m strato.launcher.probe "
               f"--temp-dir {self.temp_dir(head)}")
        try:
            code, tail = runner.run(cmd, check=False, quiet=True, timeout=timeout)
        except LauncherError:
            return None
        for line in reversed(tail.splitlines()):
            if line.startswith("{"):
                try:
                    info = json.loads(line)
                except ValueError:
                    break
                return info if info.get("running") else None
        return None


def open_cluster(config_path: str | os.PathLike, *, echo: bool = True,
                 prepare: bool = False) -> Cluster:
    """Load the config and bind it to its provider, token and remembered provider facts."""
    cluster = Cluster(load_config(config_path), echo=echo)
    cluster.token = cluster.state.token(cluster.name)
    cluster.facts = cluster.state.facts(cluster.name)
    if prepare:
        cluster.prepare()
    return cluster
