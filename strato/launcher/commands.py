"""The cluster commands as library functions; ``strato.cli.cluster`` is a thin wrapper.

``up`` is idempotent: it compares each node's tags with the config (launch hash: replace
the machine; setup hash: run setup again; status ``update-failed``: retry) and creates
only what is missing. ``down`` finds nodes by the provider's tags, so it also cleans up
after a half-failed ``up`` or a lost state directory. Output of nodes is streamed with the
node's name as prefix and kept under ``$STRATO_HOME/logs/<cluster>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from strato.exceptions import CapacityError, LauncherError
from strato.launcher import bootstrap
from strato.launcher.autoscaler.plan import (
    TypeBackoff,
    next_option,
    record_capacity_failure,
)
from strato.launcher.cluster import TAG_NODE_ID_LABEL, Cluster
from strato.launcher.config import load_config
from strato.launcher.pricing import Pricing, node_cost
from strato.launcher.runner import CommandRunner, shell_path
from strato.localfiles import write_secret
from strato.providers.base import (
    TAG_GOING_DOWN,
    TAG_KIND,
    TAG_LAUNCH_HASH,
    TAG_NAME,
    TAG_NODE_TYPE,
    TAG_SETUP_HASH,
    TAG_STATUS,
    GoingDown,
    Node,
    NodeKind,
    NodeStatus,
)
from strato.ssh import ADDRESS_MAP_ENV, ADDRESS_MAP_STRICT_ENV

__all__ = ["UpResult", "attach", "down", "exec_", "get_head_ip", "logs", "rsync_down",
           "rsync_up", "status", "submit", "up"]

console = Console(highlight=False, soft_wrap=True)
HEAD = NodeKind.HEAD.value
WORKER = NodeKind.WORKER.value
DOWN_CONNECT_TIMEOUT = 5.0   # `down` must not wait long for a node that is gone
PARALLEL_BOOTSTRAPS = 16
STATUS_EVENTS = 20           # recent events `status` returns
LAUNCH_PROBLEMS = ("capacity-error", "fallback", "launch-failed", "setup-failed")


def _say(message: str) -> None:
    console.print(f"[bold blue]strato[/]: {message}")


# ---------------------------------------------------------------- opening a cluster
def _open(config_path: str | os.PathLike, *, echo: bool = True,
          prepare: bool = False) -> Cluster:
    """Load the config and bind it to its provider, token and remembered provider facts."""
    cluster = Cluster(load_config(config_path), echo=echo)
    cluster.token = cluster.state.token(cluster.name)
    cluster.facts = cluster.state.facts(cluster.name)
    if prepare:
        cluster.prepare()
    return cluster


def _config_hash(cluster: Cluster) -> str:
    text = json.dumps(cluster.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise LauncherError(f"{question} Pass -y / --yes to confirm when not on a terminal.")
    from rich.prompt import Confirm

    if not Confirm.ask(question, default=False):
        raise LauncherError("aborted")


def _head_address(cluster: Cluster, head: Node) -> str:
    """The head service address: remembered by ``up``, else asked from the head."""
    record = cluster.state.get(cluster.name)
    if record and record.head_address:
        return record.head_address
    info = cluster.runtime_info(head)
    if not info:
        raise LauncherError(f"cluster {cluster.name!r}: the head's runtime is not running; "
                            "run `strato up` (or `strato up --restart-only`)")
    return info["head_address"]


def _new_tags(cluster: Cluster, kind: str, node_type: str) -> dict[str, str]:
    return {TAG_KIND: kind, TAG_NODE_TYPE: node_type,
            TAG_LAUNCH_HASH: cluster.launch_hash(node_type),
            TAG_STATUS: NodeStatus.PENDING.value, TAG_NAME: f"strato-{cluster.name}-{kind}"}


def _needs_setup(cluster: Cluster, node: Node) -> bool:
    node_type = node.node_type or ""
    return (node.tags.get(TAG_STATUS) != NodeStatus.UP_TO_DATE.value
            or node.tags.get(TAG_SETUP_HASH) != cluster.setup_hash(node_type,
                                                                   head=node.kind == HEAD))


# ---------------------------------------------------------------- up
@dataclass
class UpResult:
    """What ``up`` did: node ids created, terminated (replaced) and bootstrapped."""

    cluster: str
    head_address: str
    created: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    bootstrapped: list[str] = field(default_factory=list)


def up(config_path: str | os.PathLike, yes: bool = False,
       min_workers_override: int | None = None, no_restart: bool = False,
       restart_only: bool = False) -> UpResult:
    """Create or update the cluster: head, ``min_workers`` of each type, the monitor.

    Only what differs from the config is touched: a changed ``node_config`` replaces the
    node, changed setup re-runs setup (and restarts the runtime unless ``no_restart``),
    ``update-failed`` nodes are retried, missing workers are created. ``restart_only``
    skips setup and restarts every runtime. ``min_workers_override`` replaces
    ``min_workers`` of every worker node type (not the head's type).
    """
    if no_restart and restart_only:
        raise LauncherError("--no-restart and --restart-only contradict each other")
    config_path = os.path.abspath(config_path)
    cluster = _open(config_path)
    state, name = cluster.state, cluster.name
    cluster.prepare()
    state.upsert(name, provider=cluster.kind, config_path=config_path,
                 config_hash=_config_hash(cluster))
    state.set_facts(name, cluster.facts)
    cluster.token = state.ensure_token(name)
    _say(f"cluster [bold]{name}[/] ({cluster.kind})")

    old_head = cluster.head()
    if old_head is not None:  # `up` below may replace nodes: the monitor must not race it
        _stop_monitor(cluster, old_head)
    result = UpResult(cluster=name, head_address="")

    # ---- head
    head, head_restarted = _up_head(cluster, result, yes, no_restart, restart_only)
    _mark_going_down(cluster, head, "")  # a `down` that was interrupted left its mark
    state.set_head(name, result.head_address)

    # ---- workers
    targets = _worker_targets(cluster, min_workers_override)
    orphans = [n for n in cluster.nodes(kind=WORKER) if n.node_type not in targets]
    if orphans:
        _say(f"terminating {len(orphans)} worker(s) of node types no longer in the config")
        cluster.provider.terminate_nodes([n.id for n in orphans])
        result.terminated += [n.id for n in orphans]
    jobs: list[tuple[Node, bool, bool]] = []   # (node, setup, restart)
    errors: list[str] = []
    info = None if head_restarted else cluster.runtime_info(head)
    alive_ids = _alive_runtime_ids(info)
    for node_type, want in targets.items():
        workers = cluster.nodes(kind=WORKER, node_type=node_type)
        outdated = [n for n in workers if not cluster.launch_hash_current(n)]
        if outdated:
            _say(f"replacing {len(outdated)} {node_type} worker(s): node_config changed")
            cluster.provider.terminate_nodes([n.id for n in outdated])
            result.terminated += [n.id for n in outdated]
            for n in outdated:
                state.add_event(name, "terminated: node_config changed", node=n.id)
        keep = [n for n in workers if cluster.launch_hash_current(n)]
        for n in keep:
            setup = not restart_only and _needs_setup(cluster, n)
            running = n.id in alive_ids
            restart = restart_only or head_restarted or not running or (setup and not no_restart)
            if setup or restart:
                jobs.append((n, setup, restart))
        missing = want - len(keep)
        if missing > 0:
            _say(f"creating {missing} worker(s) of type {node_type}")
            created, error = _create_workers(cluster, node_type, missing,
                                             {n.id for n in workers})
            if error:
                errors.append(f"{node_type}: {error}")
            for n in created:
                state.add_event(name, f"created {node_type} worker", node=n.id)
            result.created += [n.id for n in created]
            jobs += [(n, True, True) for n in created]

    errors += _bootstrap_all(cluster, jobs, result.head_address)
    result.bootstrapped += [n.id for n, _, _ in jobs]
    _start_monitor(cluster, cluster.require_head(), result.head_address, targets)
    if errors:
        raise LauncherError(f"cluster {name!r}: {len(errors)} node(s) failed; the head is up at "
                            f"{result.head_address}; `strato up` retries them:\n"
                            + "\n".join(errors))
    _record_costs(cluster, cluster.nodes(alive_only=False))
    _say(f"cluster [bold]{name}[/] is up; head at {result.head_address}")
    return result


def _create_workers(cluster: Cluster, node_type: str, count: int,
                    existing: set[str]) -> tuple[list[Node], str | None]:
    """Create ``count`` workers where the autoscaler would (``plan.next_option``): the
    type's zones in order on a capacity error, then on-demand if ``fallback_to_on_demand``;
    a type named by GPU walks its instance types and zones cheapest first the same way.
    Every node is tagged with its price per hour.

    Returns the nodes created (also those a failed partial create left behind, found by
    their tags) and, if some could not be created anywhere, why.
    """
    pricing = Pricing(cluster.config, cluster.provider)
    info = pricing.type_info(node_type)
    backoffs: list[TypeBackoff] = []
    created: list[Node] = []
    last: CapacityError | None = None
    now = time.time()
    option = next_option(info, backoffs, now)
    while option is not None and count > 0:
        where = _where(option)
        spec, price_tags = pricing.launch(node_type, option)
        try:
            made = cluster.provider.create_nodes(
                spec, count, {**_new_tags(cluster, WORKER, node_type), **price_tags},
                zone=option.zone, spot=option.spot)
        except CapacityError as e:
            last = e
            backoffs = record_capacity_failure(backoffs, node_type, option.zone, option.spot,
                                               now, instance_type=option.instance_type)
            # a partial create leaves some nodes behind: keep them, create only the rest
            known = existing | {n.id for n in created}
            left = [n for n in cluster.nodes(kind=WORKER, node_type=node_type)
                    if n.id not in known]
            created += left
            count -= len(left)
            option = next_option(info, backoffs, now)
            if option is None:
                break
            message = (f"no capacity for {node_type} {where} ({e.code or 'capacity'}); "
                       f"trying {_where(option)}")
            _say(f"[yellow]{message}[/]")
            cluster.state.add_event(cluster.name, message)
            continue
        if last is not None:
            message = f"created {len(made)} {node_type} worker(s) {where} (fallback)"
            _say(message)
            cluster.state.add_event(cluster.name, message)
        created += made
        count -= len(made)
    _record_costs(cluster, created)
    if count <= 0:
        return created, None
    message = f"no capacity for {count} {node_type} worker(s) in any zone it may use: {last}"
    cluster.state.add_event(cluster.name, message)
    return created, message


def _where(option: Any) -> str:
    """``g5.xlarge spot in us-east-1a`` (the instance type only for types named by GPU)."""
    what = f"{option.instance_type} " if option.instance_type else ""
    return (f"{what}{'spot' if option.spot else 'on-demand'} in "
            f"{option.zone or 'the default zone'}")


def _record_costs(cluster: Cluster, nodes: Sequence[Node], ended: float | None = None) -> None:
    """Remember nodes in the cost history (``cost-report``); never fails the command."""
    if not nodes:
        return
    try:
        pricing = Pricing(cluster.config, cluster.provider)
        now = time.time()
        cluster.state.record_nodes([pricing.cost_record(n, now, ended) for n in nodes])
    except Exception as e:  # bookkeeping only
        _say(f"[yellow]could not record node costs: {e}[/]")


def _up_head(cluster: Cluster, result: UpResult, yes: bool, no_restart: bool,
             restart_only: bool) -> tuple[Node, bool]:
    """Reuse, update or replace the head; returns it and whether its runtime restarted."""
    config, name = cluster.config, cluster.name
    head_type = config.head_node_type
    head = None
    for node in cluster.nodes(kind=HEAD):
        current = cluster.launch_hash_current(node) and node.node_type == head_type
        if current and head is None:
            head = node
            continue
        _confirm(f"The head node {node.id} differs from the config (node_config changed); "
                 "replace it?", yes)
        _say(f"terminating head {node.id} (node_config changed)")
        cluster.provider.terminate_nodes([node.id])
        cluster.state.add_event(name, "terminated head: node_config changed", node=node.id)
        result.terminated.append(node.id)
    if head is None:
        _say(f"creating head node ({head_type})")
        pricing = Pricing(config, cluster.provider)
        option = next_option(pricing.type_info(head_type), [], time.time())
        spec, price_tags = pricing.launch(head_type, option)
        head = cluster.provider.create_nodes(
            spec, 1, {**_new_tags(cluster, HEAD, head_type), **price_tags},
            zone=option.zone, spot=option.spot)[0]
        cluster.state.add_event(name, "created head", node=head.id)
        result.created.append(head.id)
        setup = restart = True
    else:
        setup = not restart_only and _needs_setup(cluster, head)
        info = None if (setup and not no_restart) or restart_only else cluster.runtime_info(head)
        restart = restart_only or (setup and not no_restart) or info is None
        if not restart and info is not None:
            result.head_address = info["head_address"]
    if setup or restart:
        _say(f"{'setting up' if setup else 'restarting'} head {cluster.label(head)}")
        address = bootstrap.bootstrap_node(cluster, head, head_address=None, setup=setup,
                                           restart=restart)
        result.bootstrapped.append(head.id)
        if address:
            result.head_address = address
    if not result.head_address:
        result.head_address = _head_address(cluster, head)
    return head, restart


def _worker_targets(cluster: Cluster, override: int | None) -> dict[str, int]:
    """How many workers of each type ``up`` keeps (head's type: only if asked for)."""
    targets = {}
    for name, nt in cluster.config.available_node_types.items():
        want = nt.min_workers
        if override is not None and name != cluster.config.head_node_type:
            want = override
        targets[name] = want
    return targets


def _alive_runtime_ids(info: dict | None) -> set[str]:
    if not info:
        return set()
    return {n.get("labels", {}).get(TAG_NODE_ID_LABEL) for n in info.get("nodes", [])
            if n.get("alive")} - {None}


def _bootstrap_all(cluster: Cluster, jobs: Sequence[tuple[Node, bool, bool]],
                   head_address: str) -> list[str]:
    """Bootstrap workers in parallel; returns one error line per failed node."""
    if not jobs:
        return []

    def one(job: tuple[Node, bool, bool]) -> str | None:
        node, setup, restart = job
        try:
            bootstrap.bootstrap_node(cluster, node, head_address=head_address, setup=setup,
                                     restart=restart)
        except Exception as e:  # reported together below; the node is tagged update-failed
            return f"{cluster.label(node)}: {e}"
        return None

    with ThreadPoolExecutor(min(PARALLEL_BOOTSTRAPS, len(jobs))) as pool:
        return [e for e in pool.map(one, jobs) if e]


# ---------------------------------------------------------------- the monitor
def _monitor_runner(cluster: Cluster, head: Node, *,
                    connect_timeout: float | None = None) -> tuple[CommandRunner, str]:
    """Where the monitor lives: the head's runner (mode head) or a local one, and its dir."""
    mdir = cluster.monitor_dir(head)
    if cluster.monitor_mode == "head":
        return cluster.runner(head, echo=False, connect_timeout=connect_timeout), mdir
    Path(mdir).mkdir(parents=True, exist_ok=True, mode=0o700)
    runner = cluster.local_runner("monitor", Path(mdir))
    runner.sink.echo = False
    return runner, mdir


def _stop_monitor(cluster: Cluster, head: Node, *,
                  connect_timeout: float | None = None) -> bool:
    """Stop the monitor (by its pid file) and wait until it has exited.

    Returns True when it is known to be stopped (or not running, or ``monitor: off``),
    False when that could not be confirmed (the head could not be reached).
    """
    if cluster.monitor_mode == "off":
        return True
    try:
        runner, mdir = _monitor_runner(cluster, head, connect_timeout=connect_timeout)
        code, tail = runner.run(bootstrap.render("stop_monitor.sh",
                                                 pid_file=shell_path(f"{mdir}/monitor.pid")),
                                check=False, quiet=True, timeout=30)
    except LauncherError as e:
        _say(f"[yellow]could not stop the monitor: {e}[/]")
        return False
    if code != 0:
        _say(f"[yellow]could not stop the monitor (exit {code}): "
             f"{(tail.strip().splitlines() or [''])[-1]}[/]")
    return code == 0


def _start_monitor(cluster: Cluster, head: Node, head_address: str,
                   min_workers: dict[str, int]) -> None:
    """Start the process that keeps ``min_workers`` (beside the head, or here)."""
    mode = cluster.monitor_mode
    if mode == "off":
        return
    runner, mdir = _monitor_runner(cluster, head)
    spec: dict[str, Any] = {
        "config": cluster.config.to_dict(), "head_address": head_address,
        "min_workers": min_workers,
        "launch_hash": {t: cluster.launch_hash(t) for t in cluster.config.available_node_types},
        "setup_hash": {f"{k}:{t}": cluster.setup_hash(t, head=k == HEAD)
                       for t in cluster.config.available_node_types for k in (HEAD, WORKER)},
        "venv": bootstrap.venv_dir() if not cluster.is_local else None,
        "key_path": cluster.key_path(),
        "ssh_user": cluster.facts.get("ssh_user") or cluster.config.auth.ssh_user,
        # prepare()'s facts (the SSH public key among them): every node the monitor
        # creates must let the head in, like those `up` created (the monitor never prepares)
        "facts": dict(cluster.facts),
    }
    env = {"STRATO_TOKEN": cluster.token or ""}
    for name in (ADDRESS_MAP_ENV, ADDRESS_MAP_STRICT_ENV):  # the tests' address seam
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(_monitor_extra_env())
    with tempfile.TemporaryDirectory(prefix="strato-monitor-") as tmp:
        if mode == "head":
            python = cluster.runtime_python(head.node_type or "")
            env["STRATO_HOME"] = f"{mdir}/home"
            _prepare_head_monitor(cluster, head, runner, mdir, spec, Path(tmp))
        else:
            python = shlex.quote(sys.executable)
            env["STRATO_HOME"] = str(cluster.state.home)
        spec_file = Path(tmp) / "spec.json"
        write_secret(spec_file, json.dumps(spec, indent=1, default=str))
        runner.put(spec_file, f"{mdir}/spec.json")
    script = bootstrap.render(
        "start_monitor.sh", monitor_dir=shell_path(mdir), python=python,
        stop_monitor=bootstrap.render("stop_monitor.sh",
                                      pid_file=shell_path(f"{mdir}/monitor.pid")))
    _, tail = runner.run(script, env=env, quiet=True, timeout=60)
    _say(f"monitor started ({mode}): {tail.splitlines()[-1] if tail else ''}")


MONITOR_ENV = "STRATO_MONITOR_ENV"


def _monitor_extra_env() -> dict[str, str]:
    """Extra environment for the monitor process, from ``STRATO_MONITOR_ENV`` (a JSON
    object). For development and tests: e.g. a cloud endpoint and credentials that the
    head would otherwise get from its instance profile / service account."""
    raw = os.environ.get(MONITOR_ENV, "").strip()
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except ValueError as e:
        raise LauncherError(f"{MONITOR_ENV} must be a JSON object of strings: {e}") from e
    if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise LauncherError(f"{MONITOR_ENV} must be a JSON object of strings")
    return extra


def _prepare_head_monitor(cluster: Cluster, head: Node, runner: CommandRunner, mdir: str,
                          spec: dict[str, Any], tmp: Path) -> None:
    """What a monitor on the head needs that lives here: key, provider state, mounts."""
    config = spec["config"]
    # file mounts were copied to the head at their remote paths: sync workers from there
    config["file_mounts"] = {remote: remote for remote in config.get("file_mounts", {})}
    key = cluster.key_path()
    if key:
        runner.put(Path(key).expanduser(), f"{mdir}/key")
        spec["key_path"] = f"{mdir}/key"
        config.setdefault("auth", {})["ssh_private_key"] = f"{mdir}/key"
    if not cluster.config.runtime_python_for(head.node_type or ""):
        wheel = bootstrap.ensure_wheel()  # for the workers the monitor will set up
        spec["wheel"] = f"{mdir}/wheels/{wheel.name}"
        runner.put(wheel, spec["wheel"])
    for local, relative in cluster.provider.monitor_state_files().items():
        runner.put(local, f"{mdir}/home/{relative}")  # e.g. a copy of the SSH host claims


# ---------------------------------------------------------------- down
DOWN_SWEEP_INTERVAL_S = 1.0
DOWN_SWEEP_GRACE_S = 20.0   # how long `down` watches for stray launches if the monitor
                            # could not be confirmed stopped
DOWN_SWEEP_LIMIT_S = 300.0  # give up (with an error) if nodes keep appearing this long


def down(config_path: str | os.PathLike, yes: bool = False,
         workers_only: bool = False) -> list[str]:
    """Terminate the cluster's nodes (found by tags) and forget it; returns node ids.

    Nothing may be launched behind ``down``'s back, so the order is: tag the head as
    going down (the autoscaler launches nothing for such a cluster, wherever it runs),
    stop the monitor and wait for it, terminate, then list the cluster again and
    terminate whatever appeared meanwhile until a listing comes back empty. Also cleans
    up after a half-failed ``up``; nodes that cannot be reached are still terminated at
    the provider (SSH hosts: their claim is released, stopping strato there is best
    effort). ``workers_only`` keeps the head and the local state, and starts the monitor
    again with ``min_workers`` 0 until the next ``up``.
    """
    cluster = _open(config_path)
    if workers_only and cluster.provider.needs_prepare_to_reach_nodes and not cluster.facts:
        cluster.prepare()  # the key to reach the head (to stop its monitor)
    name = cluster.name
    nodes = cluster.nodes(alive_only=False)
    targets = [n for n in nodes if not workers_only or n.kind != HEAD]
    what = "the workers of" if workers_only else "every node of"
    _confirm(f"Terminate {what} cluster {name!r} ({len(targets)} node(s))?", yes)
    heads = [n for n in nodes if n.kind == HEAD]
    head = next((n for n in heads if n.is_alive), None)
    mark = GoingDown.WORKERS if workers_only else GoingDown.ALL
    stopped = True
    if head is not None:
        _mark_going_down(cluster, head, mark.value)
    if head is not None or (heads and cluster.monitor_mode == "local"):
        stopped = _stop_monitor(cluster, head or heads[0],
                                connect_timeout=DOWN_CONNECT_TIMEOUT)
    _record_costs(cluster, targets)
    if targets:
        _say(f"terminating {len(targets)} node(s): {', '.join(cluster.label(n) for n in targets)}")
        cluster.provider.terminate_nodes([n.id for n in targets])
    done = {n.id for n in targets}
    strays = _sweep(cluster, done, workers_only=workers_only,
                    grace=0.0 if stopped else DOWN_SWEEP_GRACE_S)
    if strays:
        _say(f"[yellow]terminated {len(strays)} node(s) launched while going down: "
             f"{', '.join(strays)}[/]")
    ids = [n.id for n in targets] + strays
    cluster.state.end_nodes(name, time.time(), None if not workers_only else ids)
    if workers_only:
        for node_id in ids:
            cluster.state.add_event(name, "terminated (down --workers-only)", node=node_id)
        if head is not None:
            _mark_going_down(cluster, head, "")
            record = cluster.state.get(name)
            if cluster.monitor_mode != "off" and record and record.head_address:
                _start_monitor(cluster, head, record.head_address,
                               {t: 0 for t in cluster.config.available_node_types})
                _say("workers terminated; the autoscaler runs on with min_workers 0 (it "
                     "launches for demand only) until `strato up` restores min_workers")
                return ids
        _say("workers terminated; `strato up` starts min_workers and the monitor again")
        return ids
    _forget(cluster)
    _say(f"cluster [bold]{name}[/] is down")
    return ids


def _mark_going_down(cluster: Cluster, head: Node, value: str) -> None:
    """Tag the head so that no autoscaler launches for this cluster ('' clears it)."""
    if head.tags.get(TAG_GOING_DOWN, "") == value:
        return
    try:
        cluster.provider.set_tags(head.id, {TAG_GOING_DOWN: value})
    except Exception as e:  # the head may be half gone; the sweep below still runs
        _say(f"[yellow]could not tag head {head.id} as going down: {e}[/]")


def _sweep(cluster: Cluster, done: set[str], *, workers_only: bool,
           grace: float) -> list[str]:
    """Terminate the cluster's live nodes not in ``done`` until a listing finds none.

    With ``grace`` > 0 (the monitor could not be confirmed stopped) listings go on for
    that long after the last one that found something. Returns the ids terminated here.
    """
    found: list[str] = []
    quiet_since = started = time.monotonic()
    while time.monotonic() - started < DOWN_SWEEP_LIMIT_S:
        fresh = [n for n in cluster.nodes(alive_only=False)
                 if n.is_alive and n.id not in done and not (workers_only and n.kind == HEAD)]
        if fresh:
            cluster.provider.terminate_nodes([n.id for n in fresh])
            for n in fresh:
                cluster.state.add_event(cluster.name, "terminated: launched while the "
                                        "cluster went down", node=n.id)
            done.update(n.id for n in fresh)
            found += [n.id for n in fresh]
            quiet_since = time.monotonic()
            continue
        if time.monotonic() - quiet_since >= grace:
            return found
        time.sleep(DOWN_SWEEP_INTERVAL_S)
    raise LauncherError(f"cluster {cluster.name!r}: nodes kept appearing for "
                        f"{DOWN_SWEEP_LIMIT_S:.0f}s while going down (terminated "
                        f"{len(found)}); is another `strato up` or a monitor elsewhere "
                        "running? Run `strato down` again once it has stopped")


def _forget(cluster: Cluster) -> None:
    """Remove every trace of the cluster from ``$STRATO_HOME``."""
    import shutil

    cluster.state.delete(cluster.name)
    cluster.provider.cleanup()
    shutil.rmtree(cluster.state.home / "monitor" / cluster.name, ignore_errors=True)


# ---------------------------------------------------------------- using the cluster
def exec_(config_path: str | os.PathLike, cmd: str, node: str = "head") -> int:
    """Run ``cmd`` on ``node`` (``head``, ``all`` or an IP), streamed; returns the exit code
    (the first non-zero one for several nodes; 255 when a node cannot be reached)."""
    cluster = _open(config_path)
    nodes = cluster.find_nodes(node)
    env = cluster.env(_head_address(cluster, cluster.require_head()))

    def one(n: Node) -> int:
        try:
            code, _ = cluster.runner(n).run(cmd, env=env, check=False)
            return code
        except LauncherError as e:
            label = cluster.label(n)
            console.print(str(e) if label in str(e) else f"{label}: {e}", style="red",
                          markup=False)
            return 255

    if len(nodes) == 1:
        return one(nodes[0])
    with ThreadPoolExecutor(min(PARALLEL_BOOTSTRAPS, len(nodes))) as pool:
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
    cluster = _open(config_path)
    head = cluster.require_head()
    env = cluster.env(_head_address(cluster, head))
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
        _say(message)
        cluster.state.add_event(cluster.name, message)
        env["STRATO_RESUME"] = "1"


def _node_losses(cluster: Cluster, head: Node, since: float | None = None) -> dict[str, Any]:
    """Node-loss events of the head's runtime at or after ``since`` (the head's clock)."""
    cmd = (f"{cluster.runtime_python(head.node_type or '')} -m "
           f"strato.launcher.autoscaler.events --temp-dir {cluster.temp_dir(head)}")
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
    cluster = _open(config_path)
    return cluster.runner(cluster.require_head()).shell()


def rsync_up(config_path: str | os.PathLike, source: str, target: str,
             node: str = "head") -> None:
    """Copy a local file or directory to ``target`` on ``node`` (head, all or an IP)."""
    cluster = _open(config_path)
    for n in cluster.find_nodes(node):
        cluster.runner(n).put(source, target)


def rsync_down(config_path: str | os.PathLike, source: str, target: str,
               node: str = "head") -> None:
    """Copy ``source`` from ``node`` (the head by default) to the local ``target``."""
    cluster = _open(config_path)
    nodes = cluster.find_nodes(node)
    if len(nodes) != 1:
        raise LauncherError("rsync-down copies from one node: pass --node head or an IP")
    cluster.runner(nodes[0]).get(source, target)


def get_head_ip(config_path: str | os.PathLike) -> str:
    """The address to reach the head at (public if it has one)."""
    cluster = _open(config_path, echo=False)
    head = cluster.require_head()
    return cluster.provider.ssh_address(head) or cluster.provider.internal_address(head)


def status(config_path: str | os.PathLike) -> dict[str, Any]:
    """Nodes as the provider sees them, joined with the runtime's view and recent events."""
    cluster = _open(config_path, echo=False)
    nodes = cluster.nodes(alive_only=False)
    head = next((n for n in nodes if n.kind == HEAD and n.is_alive), None)
    info = cluster.runtime_info(head, timeout=20) if head is not None else None
    by_id = {n.get("labels", {}).get(TAG_NODE_ID_LABEL): n for n in (info or {}).get("nodes", [])}
    record = cluster.state.get(cluster.name)
    auto_events = _autoscaler_events(cluster, head)
    now = time.time()
    pricing = Pricing(cluster.config, cluster.provider)
    _record_costs(cluster, nodes)
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
        "autoscaler": {
            "events": auto_events[-STATUS_EVENTS:],
            # why nodes are missing: capacity errors, fallbacks, failed launches and setups
            "launch_problems": [e for e in auto_events if e.get("kind") in LAUNCH_PROBLEMS
                                ][-STATUS_EVENTS:],
        },
    }


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
    cluster = _open(config_path, echo=False)
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
