"""Finding and reaching a cluster's client endpoint, bringing the cluster up if needed.

The head binds its client endpoint on 127.0.0.1 and records the port in its node file.
A client of a local-provider cluster connects to it directly; any other reaches it
through the pooled SSH connection to the head (``strato.ssh.open_tunnel``), so nothing
but SSH has to be open. ``open_endpoint`` attaches when the cluster is up with the config
of its last ``up``, and otherwise runs ``up`` first (its progress shown, its errors
raised as they are).
"""

from __future__ import annotations

import json
import shlex
import socket
import time
from dataclasses import dataclass

from strato import ssh
from strato.exceptions import LauncherError, SSHUnavailableError
from strato.launcher.cluster import Cluster, open_cluster
from strato.launcher.config import AutostopConfig
from strato.launcher.console import say
from strato.providers.base import TAG_AUTOSTOPPED, NodeKind, NodeState
from strato.runtime.protocol.handshake import client_handshake
from strato.runtime.session import node_files


@dataclass
class Endpoint:
    """Where a cluster's client endpoint is and how to open a session on it."""

    cluster: str
    head_address: str
    token: str
    port: int
    target: ssh.SSHTarget | None    # None: the head runs on this machine

    def socket(self) -> socket.socket:
        if self.target is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return ssh.open_tunnel(self.target, "127.0.0.1", self.port)

    def connect(self, session: str) -> tuple[socket.socket, dict]:
        """A socket with a session on it (handshake done) and the head's answer."""
        sock = self.socket()
        try:
            return sock, client_handshake(sock, self.token, session)
        except BaseException:
            sock.close()
            raise


def open_endpoint(config_path: str, session: str) -> tuple[Endpoint, socket.socket, dict]:
    """Attach to the cluster of ``config_path`` (running ``up`` first if it is not up
    or its config changed since the last ``up``); returns the endpoint, a connected
    socket and the head's handshake answer."""
    cluster = open_cluster(config_path)
    reason = _why_not_attach(cluster)
    if reason is None:
        endpoint = find_endpoint(cluster)
        if endpoint is None:
            reason = "its head runtime is not running"
        else:
            try:
                return (endpoint, *endpoint.connect(session))
            except (OSError, SSHUnavailableError) as e:
                reason = f"its head does not answer ({e})"
    say(f"cluster [bold]{cluster.name}[/]: {reason}; running `strato up`")
    from strato.launcher import reconcile  # only when needed: it imports much more

    reconcile.up(config_path, yes=True)
    cluster = open_cluster(config_path)
    endpoint = find_endpoint(cluster)
    if endpoint is None:
        raise LauncherError(f"cluster {cluster.name!r} is up but its head reports no client "
                            "endpoint; is the head's strato older than this client? "
                            "(`strato up --restart-only` restarts its runtime)")
    return (endpoint, *endpoint.connect(session))


def _why_not_attach(cluster: Cluster) -> str | None:
    record = cluster.state.get(cluster.name)
    if record is None or not cluster.token:
        return "it is not up"
    if record.config_hash != cluster.config_hash():
        return "its config changed since the last `strato up`"
    if cluster.head() is None:
        return gone_reason(cluster)
    return None


def gone_reason(cluster: Cluster) -> str:
    """Why a cluster this machine remembers has no running head (autostopped, or gone)."""
    heads = [n for n in cluster.machines(include_terminated=True)
             if n.kind == NodeKind.HEAD.value]
    stopped = next((n for n in heads if n.tags.get(TAG_AUTOSTOPPED)), None)
    if stopped is not None:
        try:
            when = time.strftime("%H:%M", time.localtime(int(stopped.tags[TAG_AUTOSTOPPED])))
        except ValueError:
            when = "?"
        how = "stopped" if stopped.state == NodeState.STOPPED else "terminated"
        return f"the head's monitor autostopped it at {when} (idle; {how}): cold start"
    last = next((e for e in reversed(cluster.state.events(cluster.name, limit=5))
                 if str(e.get("message", "")).startswith("autostopped")), None)
    if last is not None:
        return f"{last['message']}: cold start"
    if any(n.state == NodeState.STOPPED for n in heads):
        return "its head is stopped"
    return "its head node is gone"


def set_autostop(config_path: str, setting: AutostopConfig | None) -> None:
    """``init(autostop=...)``: make the cluster's monitor use ``setting`` until the next
    ``up`` (None: no autostop)."""
    from strato.launcher.monitor import set_autostop as set_on_monitor

    cluster = open_cluster(config_path, echo=False)
    set_on_monitor(cluster, cluster.require_head(), setting)


def find_endpoint(cluster: Cluster) -> Endpoint | None:
    """The head's client endpoint from its node file (over SSH for remote heads)."""
    head = cluster.require_head()
    runner = cluster.runner(head, echo=False)
    if cluster.is_local:
        infos = node_files(cluster.temp_dir_path(head))
        target = None
    else:
        nodes = shlex.quote(cluster.temp_dir_path(head) + "/nodes")
        code, out = runner.run(f'for f in {nodes}/*.json; do [ -f "$f" ] && cat "$f"; echo; '
                               "done", check=False, quiet=True, timeout=30)
        infos = []
        for line in out.splitlines():
            try:
                infos.append(json.loads(line))
            except ValueError:
                continue
        infos.sort(key=lambda i: i.get("started", 0), reverse=True)
        target = runner.target
    info = next((i for i in infos if i.get("head") and i.get("client_port")), None)
    if info is None:
        return None
    return Endpoint(cluster.name, info["head_address"], cluster.token or "",
                    int(info["client_port"]), target)


__all__ = ["Endpoint", "find_endpoint", "gone_reason", "open_endpoint", "set_autostop"]
