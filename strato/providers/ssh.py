"""On-prem hosts reachable over SSH, as a node provider.

Nothing is created here: "creating" a node claims a free host from the ``provider:``
section (``head_ip`` for the head, else the first free of ``worker_ips``). Claims and
tags live in ``$STRATO_HOME/ssh/<cluster>.json`` (0600, file-locked), so ``down`` from
another process sees what ``up`` claimed. ``Node.id`` is the host's IP.

Provider config keys::

    type: ssh
    head_ip: 10.0.0.2
    worker_ips: [10.0.0.3, 10.0.0.4]
    ssh_port: 22                 # optional, the same for every host
    ssh_user: ubuntu             # optional; the launcher copies ``auth:`` here
    ssh_private_key: ~/.ssh/id   # optional; used to stop strato on terminate
    stop_command: strato stop    # optional; run best-effort on terminate ("" = skip)
    known_hosts_file: ~/.ssh/known_hosts  # optional; hosts listed there must present
                                          # that key (others are pinned on first contact)

Terminating a node releases its claim and runs ``stop_command`` over SSH (best effort,
short timeout) through ``strato.ssh``, imported lazily so listing and claiming never need
it. The launcher chooses that command (e.g. ``<runtime_python> -m strato.cli stop``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strato.exceptions import CapacityError, ConfigError
from strato.localfiles import strato_home
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    ConfigProblem,
    Node,
    NodeKind,
    NodeState,
    NodeTypeSpec,
    config_sections,
)
from strato.providers.records import RecordProvider

log = logging.getLogger(__name__)

DEFAULT_STOP_COMMAND = "strato stop"
STOP_TIMEOUT = 20.0


def _state_dir() -> Path:
    return strato_home() / "ssh"


class SSHProvider(RecordProvider):
    """Hands out a fixed list of SSH hosts as the nodes of one cluster."""

    can_create_nodes = False        # hosts are claimed, never made
    stops_strato_on_terminate = True

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[ConfigProblem]:
        provider, types = config_sections(config)
        problems = []
        if not provider.get("head_ip"):
            problems.append(ConfigProblem(("provider", "head_ip"),
                                          "required for provider type 'ssh'"))
        for name, nt in types.items():
            if isinstance(nt, Mapping) and nt.get("spot"):
                problems.append(ConfigProblem(("available_node_types", name, "spot"),
                                              "ignored: SSH hosts are never spot",
                                              warning=True))
        return problems

    def __init__(self, provider_config: Mapping[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        cfg = self.provider_config
        self.head_ip: str | None = cfg.get("head_ip") or None
        workers = cfg.get("worker_ips") or []
        if isinstance(workers, str) or not isinstance(workers, Sequence):
            raise ConfigError("provider.worker_ips must be a list of addresses")
        self.worker_ips: list[str] = [str(ip) for ip in workers]
        if self.head_ip is None:
            raise ConfigError("provider.head_ip is required for the ssh provider")
        if self.head_ip in self.worker_ips:
            raise ConfigError(f"provider.worker_ips lists the head {self.head_ip} as a worker")
        if len(set(self.worker_ips)) != len(self.worker_ips):
            raise ConfigError("provider.worker_ips has duplicates")
        self.ssh_port = int(cfg.get("ssh_port", 22))
        self.stop_command: str = cfg.get("stop_command", DEFAULT_STOP_COMMAND) or ""
        self.state_path = _state_dir() / f"{cluster_name}.json"
        self.lock_path = self.state_path.with_suffix(".lock")

    @property
    def user_known_hosts_file(self) -> str | None:
        """On-prem hosts are often in the user's own known_hosts: honour it."""
        return str(self.provider_config.get("known_hosts_file") or "~/.ssh/known_hosts")

    # ------------------------------------------------------------ state file
    def _node(self, ip: str, record: Mapping[str, Any]) -> Node:
        return Node(id=ip, state=NodeState.RUNNING, tags=dict(record.get("tags", {})),
                    private_ip=ip, public_ip=ip, launch_time=record.get("launch_time"))

    # ------------------------------------------------------------ interface
    def prepare(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """Remember ``auth:`` (user and key path, never key contents) for terminate."""
        auth = config.get("auth") or {}
        self.provider_config.setdefault("ssh_user", auth.get("ssh_user"))
        self.provider_config.setdefault("ssh_private_key", auth.get("ssh_private_key"))
        return {}

    def create_nodes(self, spec: NodeTypeSpec, count: int, tags: Mapping[str, str], *,
                     zone: str | None = None, spot: bool | None = None) -> list[Node]:
        """Claim ``count`` free hosts (the head, or workers in listed order); no host is contacted."""
        if count <= 0:
            return []
        is_head = tags.get(TAG_KIND) == NodeKind.HEAD.value
        pool = [self.head_ip] if is_head else self.worker_ips
        all_tags = {**tags, TAG_CLUSTER: self.cluster_name}
        with self._state(write=True) as state:
            free = [ip for ip in pool if ip not in state["nodes"]]
            if len(free) < count:
                what = "head host" if is_head else "worker hosts"
                raise CapacityError(
                    f"ssh provider: no free host for node type {spec.name!r} in cluster "
                    f"{self.cluster_name!r}: {count} requested, {len(free)} of {len(pool)} "
                    f"{what} free ({', '.join(pool) or 'none listed'})",
                    node_type=spec.name, spot=False, code="NoFreeHost")
            now = time.time()
            for ip in free[:count]:
                state["nodes"][ip] = {"tags": dict(all_tags), "launch_time": now}
            return [self._node(ip, state["nodes"][ip]) for ip in free[:count]]

    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Release the claims, then stop strato on each host (best effort, never raises)."""
        with self._state(write=True) as state:
            released = [ip for ip in node_ids if state["nodes"].pop(ip, None) is not None]
        for ip in released:
            self._stop_host(ip)

    def monitor_state_files(self) -> dict[Path, str]:
        """The host claims: a monitor on the head works on a copy (it only restarts
        runtimes there, never claims)."""
        if not self.state_path.exists():
            return {}
        return {self.state_path: f"ssh/{self.state_path.name}"}

    def cleanup(self) -> None:
        """Remove the claims file once no host is claimed (``down`` calls this)."""
        if self.list_nodes():
            return
        for path in (self.state_path, self.lock_path):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ helpers
    def _stop_host(self, ip: str) -> None:
        """Run ``stop_command`` on a released host; failures are logged, not raised."""
        if not self.stop_command:
            return
        from strato import ssh  # lazy: only terminate needs SSH

        user = self.provider_config.get("ssh_user")
        target = ssh.SSHTarget(host=ip, port=self.ssh_port, node_id=ip, name=ip,
                               key_path=self.provider_config.get("ssh_private_key"),
                               known_hosts=str(ssh.pinned_hosts_path(self.cluster_name)),
                               user_known_hosts=self.user_known_hosts_file,
                               **({"user": user} if user else {}))
        try:
            ssh.run(target, self.stop_command, stream_to=ssh.silent, check=False,
                    timeout=STOP_TIMEOUT, connect_timeout=5.0)
        except Exception as e:  # best effort: the claim is already released
            log.warning("ssh provider: could not stop strato on %s: %s", ip, e)


PROVIDER = SSHProvider
