"""The everyday cluster commands as library functions: exec, submit, attach, rsync,
get-head-ip / get-worker-ips, status, logs, monitor (follow the autoscaler's log) and
kill-random-node (``up``/``down`` live in ``reconcile``, cluster-dump in ``dump``);
``strato.cli.cluster`` wraps them.

Output of nodes is streamed with the node's name as prefix (``exec`` on one node: as it
is, so it can be redirected) and kept under ``$STRATO_HOME/logs/<cluster>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from strato.exceptions import LauncherError
from strato.launcher.cluster import TAG_NODE_ID_LABEL, Cluster, open_cluster
from strato.launcher.console import confirm, err_console, say
from strato.launcher.pricing import Pricing, node_cost
from strato.launcher.runner import shell_path
from strato.providers.base import TAG_SETUP_HASH, TAG_STATUS, Node, NodeKind

__all__ = ["attach", "exec_", "get_head_ip", "get_worker_ips", "kill_random_node", "logs",
           "monitor", "monitor_log_path", "rsync_down", "rsync_up", "status", "submit"]

HEAD = NodeKind.HEAD.value
WORKER = NodeKind.WORKER.value
PARALLEL_EXECS = 16
STATUS_EVENTS = 20           # recent events `status` returns
LAUNCH_PROBLEMS = ("capacity-error", "fallback", "launch-failed", "setup-failed")


def exec_(config_path: str | os.PathLike, cmd: str, node: str = "head") -> int:
    """Run ``cmd`` on ``node`` (``head``, ``all`` or an IP), streamed; returns the exit code
    (the first non-zero one for several nodes; 255 when a node cannot be reached).

    One node's output is printed as it is; several nodes' lines are prefixed with the
    node's name. Errors go to stderr."""
    cluster = open_cluster(config_path)
    nodes = cluster.find_nodes(node)
    env = cluster.env(cluster.head_address(cluster.require_head()))

    def one(n: Node, plain: bool = False) -> int:
        try:
            code, _ = cluster.runner(n, plain=plain).run(cmd, env=env, check=False)
            return code
        except LauncherError as e:
            label = cluster.label(n)
            err_console.print(str(e) if label in str(e) else f"{label}: {e}", style="red",
                              markup=False)
            return 255

    if len(nodes) == 1:  # its output as it is, like ssh: `strato exec c.yaml "cat f" > f`
        return one(nodes[0], plain=True)
    with ThreadPoolExecutor(min(PARALLEL_EXECS, len(nodes))) as pool:
        codes = list(pool.map(one, nodes))
    return next((c for c in codes if c != 0), 0)


def submit(config_path: str | os.PathLike, script: str | os.PathLike,
           args: Sequence[str] = (), spot_recovery: int = 0) -> int:
    """Upload ``script`` to the head and run it there with the cluster's address in the
    environment (``strato.init(address="auto")`` connects); returns its exit code.

    ``spot_recovery``: relaunch the job up to this many times with ``STRATO_RESUME=1``
    when it was preempted. A job counts as preempted when it exits non-zero and the head
    recorded a node loss (spot preemption notice or a node's death) while it ran: the job
    itself runs on the head, so it dies of the workers it used being taken away. A job
    that fails with no node lost is not relaunched.
    """
    if spot_recovery < 0:
        raise LauncherError(f"submit: --spot-recovery must be >= 0 (got {spot_recovery})")
    script = Path(script)
    if not script.is_file():
        raise LauncherError(f"submit: no such script {script}")
    cluster = open_cluster(config_path)
    head = cluster.require_head()
    env = cluster.env(cluster.head_address(head))
    runner = cluster.runner(head)
    workdir = f"{cluster.scratch_dir(head)}/submit"
    runner.put(script, f"{workdir}/{script.name}")
    python = cluster.runtime_python(head.node_type or "")
    argv = " ".join(shlex.quote(a) for a in [script.name, *args])
    command = f"cd {shell_path(workdir)} && exec {python} -u {argv}"
    recoveries = 0
    while True:
        since = _node_losses(cluster, head)["now"] if spot_recovery else None
        code, _ = runner.run(command, env=env, check=False)
        if code == 0 or recoveries >= spot_recovery:
            return code
        losses = _node_losses(cluster, head, since).get("losses")
        if not losses:
            return code
        recoveries += 1
        what = f"{losses[-1].get('kind')} of node {str(losses[-1].get('node'))[:8]}"
        message = (f"job {script.name} exited {code} after a {what}; relaunching with "
                   f"STRATO_RESUME=1 (recovery {recoveries} of {spot_recovery})")
        say(message)
        cluster.state.add_event(cluster.name, message)
        env["STRATO_RESUME"] = "1"


def _node_losses(cluster: Cluster, head: Node, since: float | None = None) -> dict[str, Any]:
    """Node-loss events of the head's runtime at or after ``since`` (the head's clock)."""
    cmd = (f"{cluster.runtime_python(head.node_type or '')} -m strato.launcher.probe "
           f"--node-losses --temp-dir {cluster.temp_dir(head)}")
    if since is not None:
        cmd += f" --since {since!r}"
    try:
        _, tail = cluster.runner(head, echo=False).run(cmd, check=False, quiet=True,
                                                      timeout=60)
    except LauncherError:
        return {"now": time.time(), "losses": None}
    for line in reversed(tail.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {"now": time.time(), "losses": None}


def attach(config_path: str | os.PathLike) -> int:
    """An interactive shell on the head; returns its exit code."""
    cluster = open_cluster(config_path)
    return cluster.runner(cluster.require_head()).shell()


def rsync_up(config_path: str | os.PathLike, source: str, target: str,
             node: str = "head") -> None:
    """Copy a local file or directory to ``target`` on ``node`` (head, all or an IP),
    leaving out what ``rsync_exclude`` / ``rsync_filter`` exclude."""
    if not os.path.lexists(os.path.expanduser(source)):
        raise LauncherError(f"rsync-up: no such local path {source!r}")
    cluster = open_cluster(config_path)
    copy_filter = cluster.config.copy_filter()
    for n in cluster.find_nodes(node):
        cluster.runner(n).put(source, target, copy_filter=copy_filter)


def rsync_down(config_path: str | os.PathLike, source: str, target: str,
               node: str = "head") -> None:
    """Copy ``source`` from ``node`` (the head by default) to the local ``target``,
    leaving out what ``rsync_exclude`` / ``rsync_filter`` exclude."""
    cluster = open_cluster(config_path)
    nodes = cluster.find_nodes(node)
    if len(nodes) != 1:
        raise LauncherError("rsync-down copies from one node: pass --node head or an IP")
    cluster.runner(nodes[0]).get(source, target, copy_filter=cluster.config.copy_filter())


def get_head_ip(config_path: str | os.PathLike) -> str:
    """The address to reach the head at (public if it has one)."""
    cluster = open_cluster(config_path, echo=False)
    head = cluster.require_head()
    return cluster.provider.ssh_address(head) or cluster.provider.internal_address(head)


def get_worker_ips(config_path: str | os.PathLike) -> list[str]:
    """The addresses of the live workers (as ``get_head_ip``: public if they have one),
    oldest first."""
    cluster = open_cluster(config_path, echo=False)
    return [cluster.provider.ssh_address(n) or cluster.provider.internal_address(n)
            for n in cluster.nodes(kind=WORKER)]


def kill_random_node(config_path: str | os.PathLike, *, hard: bool = False,
                     yes: bool = False, choose: Callable[[list[Node]], Node] = random.choice
                     ) -> Node:
    """Kill one live worker picked at random (never the head), to test fault tolerance.

    By default its runtime is stopped (``strato stop`` on the node) and the machine stays:
    the autoscaler restarts or replaces it as for any dead node. ``hard`` terminates the
    machine at the provider instead (an SSH host is released), as a preemption would.
    Returns the node killed."""
    cluster = open_cluster(config_path)
    what = "terminate the machine of" if hard else "stop the runtime of"
    confirm(f"This will {what} a random worker of cluster {cluster.name!r}. Continue?", yes)
    workers = cluster.nodes(kind=WORKER)
    if not workers:
        raise LauncherError(f"cluster {cluster.name!r} has no live workers to kill")
    node = choose(workers)
    label = cluster.label(node)
    if hard:
        say(f"terminating {label} ({node.id})")
        cluster.provider.terminate_nodes([node.id])
        message = "killed by kill-random-node --hard: machine terminated"
    else:
        say(f"stopping the runtime of {label} ({node.id})")
        cmd = (f"{cluster.runtime_python(node.node_type or '')} -m strato.cli stop "
               f"--temp-dir {cluster.temp_dir(node)}")
        cluster.runner(node, echo=False).run(cmd, timeout=60)
        message = "killed by kill-random-node: runtime stopped"
    cluster.state.add_event(cluster.name, message, node=node.id)
    return node


# ---------------------------------------------------------------- the monitor's log
MONITOR_LOG = "monitor.log"
FOLLOW_POLL_S = 0.5
FIRST_READ_BYTES = 1 << 20


def monitor_log_path(cluster: Cluster, head: Node | None) -> str:
    """Where the monitor writes its log (on the head when it runs there, else here)."""
    return f"{cluster.monitor_dir(head)}/{MONITOR_LOG}"


def monitor(config_path: str | os.PathLike, lines: int = 100, *, follow: bool = True,
            write: Callable[[str], None] | None = None, poll: float = FOLLOW_POLL_S) -> int:
    """Print the last ``lines`` lines of the autoscaler's log, then (with ``follow``) what
    it writes next, until Ctrl-C; returns 0. The log is on the head, read over SSH
    (``monitor: head``), or here (``monitor: local``); the token is shown as ``***``."""
    cluster = open_cluster(config_path, echo=False)
    if cluster.monitor_mode == "off":
        raise LauncherError(f"cluster {cluster.name!r} runs no monitor (provider.monitor "
                            "or STRATO_MONITOR is off)")
    head = cluster.require_head() if cluster.monitor_mode == "head" else cluster.head()
    path = monitor_log_path(cluster, head)
    if cluster.monitor_mode == "head":
        from strato.ssh.files import read_from

        target = cluster.runner(head, echo=False).target  # type: ignore[attr-defined]

        def read(offset: int) -> tuple[int, bytes] | None:
            return read_from(target, path, offset)
    else:
        def read(offset: int) -> tuple[int, bytes] | None:
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    f.seek(min(offset, size))
                    return size, f.read(max(0, min(FIRST_READ_BYTES, size - offset)))
            except FileNotFoundError:
                return None
    out = write or _write_stdout
    secret = cluster.token

    def show(text: str) -> None:
        out(text.replace(secret, "***") if secret else text)

    try:
        first = read(1 << 62)
        size = first[0] if first else 0
        start = max(0, size - FIRST_READ_BYTES)
        got = read(start) if first else None
        data = got[1] if got else b""
        offset = start + len(data)
        if start:
            data = data.partition(b"\n")[2]  # the first line read is a partial one
        complete, _, buffer = data.rpartition(b"\n")
        if lines > 0 and complete:
            for raw in complete.split(b"\n")[-lines:]:
                show(raw.decode("utf-8", errors="replace"))
        if not first:
            err_console.print(f"strato: no monitor log yet at {path}; waiting for it",
                              style="yellow")
        while follow:
            time.sleep(poll)
            got = read(offset)
            if got is None:
                continue
            if got[0] < offset:  # rotated or truncated: from the start again
                offset, buffer = 0, b""
                continue
            offset += len(got[1])
            buffer += got[1]
            *done, buffer = buffer.split(b"\n")
            for raw in done:
                show(raw.decode("utf-8", errors="replace"))
    except KeyboardInterrupt:
        pass
    return 0


def _write_stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- status and logs
def status(config_path: str | os.PathLike) -> dict[str, Any]:
    """Nodes as the provider sees them, joined with the runtime's view and recent events."""
    cluster = open_cluster(config_path, echo=False)
    nodes = cluster.nodes(alive_only=False)
    head = next((n for n in nodes if n.kind == HEAD and n.is_alive), None)
    info = cluster.runtime_info(head, timeout=20) if head is not None else None
    by_id = {n.get("labels", {}).get(TAG_NODE_ID_LABEL): n for n in (info or {}).get("nodes", [])}
    record = cluster.state.get(cluster.name)
    auto_events = _autoscaler_events(cluster, head)
    now = time.time()
    pricing = Pricing(cluster.config, cluster.provider)
    cluster.record_costs(nodes)
    history = {r.node_id: r for r in cluster.state.node_costs(cluster.name)}
    out_nodes = []
    for n in nodes:
        rt = by_id.get(n.id)
        price, price_source = pricing.node_price(n)
        seen = history.get(n.id)
        start = n.launch_time or (seen.launched if seen else None)
        end = now if n.is_alive else (seen.ended or seen.last_seen if seen else None)
        so_far = node_cost(price, start, end)[1] if price is not None and start and end \
            else None
        node_type = n.node_type or ""
        known_type = node_type in cluster.config.available_node_types
        setup_current = known_type and n.tags.get(TAG_SETUP_HASH) == cluster.setup_hash(
            node_type, head=n.kind == HEAD)
        out_nodes.append({
            "id": n.id, "type": node_type, "kind": n.kind, "state": n.state.value,
            "status": n.tags.get(TAG_STATUS, ""),
            "ip": cluster.provider.ssh_address(n) or n.private_ip,
            "internal_ip": n.private_ip, "spot": n.spot, "preempted": n.preempted,
            "zone": n.zone, "instance_type": n.instance_type,
            "uptime": round(now - n.launch_time, 1) if n.launch_time else None,
            "launch_hash_current": cluster.launch_hash_current(n),
            "setup_hash_current": setup_current,
            "runtime": None if info is None else (
                "missing" if rt is None else ("alive" if rt.get("alive") else "dead")),
            "resources": rt.get("resources") if rt else None,
            "idle_seconds": rt.get("idle_seconds") if rt else None,
            # USD per hour as launched (spot or on-demand), and what it cost until now
            "price_per_hour": price, "price_source": price_source,
            "cost_so_far": None if so_far is None else round(so_far, 6),
        })
    return {
        "cluster": cluster.name, "provider": cluster.kind,
        "head_address": (info or {}).get("head_address") or (record.head_address if record
                                                            else None),
        "monitor": cluster.monitor_mode,
        "nodes": out_nodes,
        "cost": _cost_summary(out_nodes, nodes),
        "runtime": {"reachable": info is not None,
                    "nodes_alive": sum(1 for n in (info or {}).get("nodes", []) if n.get("alive")),
                    "demand": (info or {}).get("demand", [])},
        "events": _merge_events(cluster.state.events(cluster.name), auto_events),
        "autostop": _autostop_status(cluster, head, (info or {}).get("activity")),
        "autoscaler": {
            "events": auto_events[-STATUS_EVENTS:],
            # why nodes are missing: capacity errors, fallbacks, failed launches and setups
            "launch_problems": [e for e in auto_events if e.get("kind") in LAUNCH_PROBLEMS
                                ][-STATUS_EVENTS:],
        },
    }


def _autostop_status(cluster: Cluster, head: Node | None,
                     activity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The autostop in effect (``init(autostop=...)``'s or the config's) and how long until
    it fires by the head's idleness (``in_seconds`` None: the cluster is active now, or
    the head could not be asked); None when there is no autostop."""
    from strato.launcher.autoscaler import autostop

    setting = cluster.config.autostop
    if head is not None and cluster.monitor_mode != "off":
        path = Path(cluster.monitor_dir(head)) / autostop.OVERRIDE_FILE
        with tempfile.TemporaryDirectory(prefix="strato-autostop-") as tmp:
            if cluster.monitor_mode == "head":
                try:
                    cluster.runner(head, echo=False, connect_timeout=10).get(
                        str(path), f"{tmp}/{autostop.OVERRIDE_FILE}")
                    path = Path(tmp) / autostop.OVERRIDE_FILE
                except (LauncherError, OSError):
                    path = None
            setting = autostop.read_override(path, setting)
    if setting is None or cluster.monitor_mode == "off":
        return None
    idle = autostop.idle_seconds(activity, 0.0, float("inf")) if head is not None else None
    active = bool(activity and activity.get("active"))
    return {"idle_minutes": setting.idle_minutes, "down": setting.down,
            "idle_seconds": None if idle is None else round(idle, 1), "active": active,
            "in_seconds": None if idle is None or active
            else round(autostop.remaining(setting, idle), 1)}


def _cost_summary(out_nodes: list[dict[str, Any]], nodes: Sequence[Node]) -> dict[str, Any]:
    """The cluster's price per hour (live nodes) and cost so far (every node listed)."""
    alive = {n.id for n in nodes if n.is_alive}
    per_hour = sum(n["price_per_hour"] or 0.0 for n in out_nodes if n["id"] in alive)
    so_far = sum(n["cost_so_far"] or 0.0 for n in out_nodes)
    unpriced = sum(1 for n in out_nodes if n["id"] in alive and n["price_per_hour"] is None)
    estimated = unpriced > 0 or any(n["spot"] and n["price_source"] != "live"
                                    for n in out_nodes if n["price_per_hour"] is not None)
    return {"per_hour": round(per_hour, 6), "so_far": round(so_far, 6), "currency": "USD",
            "estimated": estimated, "unpriced_nodes": unpriced}


def _autoscaler_events(cluster: Cluster, head: Node | None) -> list[dict[str, Any]]:
    """The autoscaler's decision log: here (local monitor) or fetched from the head."""
    from strato.launcher.autoscaler.events import EVENTS_FILE, read_events

    if cluster.monitor_mode == "local" or head is None:
        return read_events(cluster.state.log_dir(cluster.name) / EVENTS_FILE, 200)
    if cluster.monitor_mode == "off":
        return []
    remote = f"{cluster.monitor_dir(head)}/home/logs/{cluster.name}/{EVENTS_FILE}"
    with tempfile.TemporaryDirectory(prefix="strato-events-") as tmp:
        try:
            cluster.runner(head, echo=False, connect_timeout=10).get(remote, f"{tmp}/events")
        except (LauncherError, OSError):
            return []
        return read_events(f"{tmp}/events", 200)


def _merge_events(launcher: list[dict[str, Any]],
                  autoscaler: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Launcher and autoscaler events in one timeline (``kind: message`` for the latter)."""
    merged = list(launcher) + [
        {"time": e.get("time", 0.0), "node": e.get("node") or "",
         "message": f"autoscaler {e.get('kind', 'event')}: {e.get('message', '')}"}
        for e in autoscaler]
    merged.sort(key=lambda e: e["time"])
    return merged[-STATUS_EVENTS:]


def logs(config_path: str | os.PathLike, node: str | None = None, lines: int = 200) -> str:
    """The launcher's log of a node (setup, runtime start) and the tail of its runtime logs."""
    cluster = open_cluster(config_path, echo=False)
    target = cluster.find_nodes(node or "head")[0]
    parts = []
    log_dir = cluster.state.log_dir(cluster.name)
    own = log_dir / f"{target.id}.log"
    parts.append(f"==> launcher log {own} <==")
    parts.append(_tail(own, lines) if own.exists() else "(none)")
    if target.kind == HEAD and cluster.monitor_mode == "local" and \
            (Path(cluster.monitor_dir(target)) / "monitor.log").exists():
        mlog = Path(cluster.monitor_dir(target)) / "monitor.log"
        parts += [f"==> monitor log {mlog} <==", _tail(mlog, lines)]
    runner = cluster.runner(target, echo=False)
    remote_logs = [f"{cluster.temp_dir_path(target)}/logs"]
    if target.kind == HEAD and cluster.monitor_mode == "head":
        remote_logs.append(f"{cluster.monitor_dir(target)}/monitor.log")
    with tempfile.TemporaryDirectory(prefix="strato-logs-") as tmp:
        for i, remote in enumerate(remote_logs):
            local = Path(tmp) / str(i)
            try:
                runner.get(remote, local)
            except (LauncherError, OSError) as e:
                parts.append(f"==> {cluster.label(target)}:{remote} <==\n(unavailable: {e})")
                continue
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*")
                                                           if p.is_file())
            for f in files:
                name = remote if f == local else f"{remote}/{f.relative_to(local)}"
                parts += [f"==> {cluster.label(target)}:{name} <==", _tail(f, lines)]
    return runner.sink.redact("\n".join(parts))


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
