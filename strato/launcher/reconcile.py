"""``up`` and ``down``: make the cluster's machines match the config, or remove them all.

``up`` is idempotent: it compares each node's tags with the config (launch hash: replace
the machine; setup hash: run setup again; status ``update-failed``: retry) and creates
only what is missing, falling back to the next zone / on-demand as the autoscaler would.
``down`` finds nodes by the provider's tags, so it also cleans up after a half-failed
``up`` or a lost state directory; nothing may be launched behind its back. Node output is
streamed with the node's name as prefix and kept under ``$STRATO_HOME/logs/<cluster>/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from strato.exceptions import CapacityError, LauncherError
from strato.launcher import bootstrap
from strato.launcher.autoscaler.options import next_option, record_capacity_failure
from strato.launcher.autoscaler.records import TypeBackoff
from strato.launcher.cluster import TAG_NODE_ID_LABEL, Cluster, open_cluster
from strato.launcher.console import confirm, say
from strato.launcher.monitor import start_monitor, stop_monitor
from strato.launcher.pricing import Pricing
from strato.launcher.runner import abort_running
from strato.providers.base import (
    TAG_GOING_DOWN,
    TAG_OWNER,
    TAG_SETUP_HASH,
    TAG_STATUS,
    GoingDown,
    Node,
    NodeKind,
    NodeState,
    NodeStatus,
)
from strato.ssh import forget_host_keys

__all__ = ["UpResult", "create_workers", "down", "up"]

HEAD = NodeKind.HEAD.value
WORKER = NodeKind.WORKER.value
DOWN_CONNECT_TIMEOUT = 5.0   # `down` must not wait long for a node that is gone
PARALLEL_BOOTSTRAPS = 16


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
       restart_only: bool = False, no_config_cache: bool = False,
       force: bool = False) -> UpResult:
    """Create or update the cluster: head, ``min_workers`` of each type, the monitor.

    Only what differs from the config is touched: a changed ``node_config`` replaces the
    node, changed setup re-runs setup (and restarts the runtime unless ``no_restart``),
    ``update-failed`` nodes are retried, missing workers are created. ``restart_only``
    skips setup and restarts every runtime. ``min_workers_override`` replaces
    ``min_workers`` of every worker node type (not the head's type).

    The config cache: ``$STRATO_HOME/state.db`` remembers per cluster what the last ``up``
    learned, the provider's facts from ``prepare`` (key pair and private key path,
    security group, subnets, firewall rules, SSH user) and the head's address; other
    commands and the monitor start from these instead of asking again. ``up`` re-runs
    ``prepare`` every time anyway; ``no_config_cache`` first forgets both, so nothing an
    earlier ``up`` learned is reused (after editing cloud resources by hand).

    Nodes of the same cluster name that another owner launched (another user, another
    ``$STRATO_HOME``) make ``up`` refuse (``OwnerConflictError``); ``force`` goes on
    beside them, never touching them.
    """
    if no_restart and restart_only:
        raise LauncherError("--no-restart and --restart-only contradict each other")
    config_path = os.path.abspath(config_path)
    cluster = open_cluster(config_path)
    state, name = cluster.state, cluster.name
    missing = [f"file_mounts: {remote!r}: no such local path {local!r}"
               for remote, local in cluster.config.file_mounts.items()
               if not os.path.lexists(os.path.expanduser(local))]
    if missing:  # before anything is created, not a traceback half-way through setup
        raise LauncherError(f"cluster {name!r}: " + "; ".join(missing))
    foreign = cluster.foreign_nodes()
    if foreign and not force:
        raise cluster.owner_conflict(foreign, "create or change nodes",
                                     "create this owner's nodes beside theirs (left alone)")
    if foreign:
        say(f"[yellow]{len(foreign)} node(s) named {name!r} of another owner are left "
            "alone (--force)[/]")
    _tag_owner(cluster)
    if no_config_cache:
        cluster.facts = {}
        if state.get(name) is not None:
            state.set_facts(name, {})
            state.set_head(name, None)
        say("config cache not used: provider facts and the head's address are learned anew")
    cluster.prepare()
    state.upsert(name, provider=cluster.kind, config_path=config_path,
                 config_hash=cluster.config_hash())
    state.set_facts(name, cluster.facts)
    cluster.token = state.ensure_token(name)
    say(f"cluster [bold]{name}[/] ({cluster.kind})")

    _start_stopped(cluster)
    old_head = cluster.head()
    if old_head is not None:  # `up` below may replace nodes: the monitor must not race it
        stop_monitor(cluster, old_head)
    result = UpResult(cluster=name, head_address="")

    # ---- head
    head, head_restarted = _up_head(cluster, result, yes, no_restart, restart_only)
    _mark_going_down(cluster, head, "")  # a `down` that was interrupted left its mark
    state.set_head(name, result.head_address)

    # ---- workers
    targets = _worker_targets(cluster, min_workers_override)
    orphans = [n for n in cluster.nodes(kind=WORKER) if n.node_type not in targets]
    if orphans:
        say(f"terminating {len(orphans)} worker(s) of node types no longer in the config")
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
            say(f"replacing {len(outdated)} {node_type} worker(s): node_config changed")
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
            say(f"creating {missing} worker(s) of type {node_type}")
            created, error = create_workers(cluster, node_type, missing,
                                            {n.id for n in workers})
            if error:
                errors.append(f"{node_type}: {error}")
            for n in created:
                state.add_event(name, f"created {node_type} worker", node=n.id)
            result.created += [n.id for n in created]
            jobs += [(n, True, True) for n in created]

    errors += _bootstrap_all(cluster, jobs, result.head_address)
    result.bootstrapped += [n.id for n, _, _ in jobs]
    start_monitor(cluster, cluster.require_head(), result.head_address, targets)
    if errors:
        raise LauncherError(f"cluster {name!r}: {len(errors)} node(s) failed; the head is up at "
                            f"{result.head_address}; `strato up` retries them:\n"
                            + "\n".join(errors))
    cluster.record_costs(cluster.nodes(alive_only=False))
    say(f"cluster [bold]{name}[/] is up; head at {result.head_address}")
    return result


def _start_stopped(cluster: Cluster) -> None:
    """Start the nodes an autostop (``down: false``) stopped, so ``up`` goes on with
    them (their runtimes restart below) instead of creating new ones beside them."""
    if not cluster.provider.can_stop_nodes:
        return
    stopped = [n for n in cluster.machines(include_terminated=True)
               if n.state in (NodeState.STOPPED, NodeState.STOPPING) and not n.preempted]
    if not stopped:
        return
    say(f"starting {len(stopped)} stopped node(s): "
        f"{', '.join(cluster.label(n) for n in stopped)}")
    cluster.provider.start_nodes([n.id for n in stopped])
    for n in stopped:  # (the head's going-down mark is cleared below, as after `down`)
        cluster.state.add_event(cluster.name, "started (was stopped)", node=n.id)


def create_workers(cluster: Cluster, node_type: str, count: int,
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
                spec, count, {**cluster.new_tags(WORKER, node_type), **price_tags},
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
            say(f"[yellow]{message}[/]")
            cluster.state.add_event(cluster.name, message)
            continue
        if last is not None:
            message = f"created {len(made)} {node_type} worker(s) {where} (fallback)"
            say(message)
            cluster.state.add_event(cluster.name, message)
        created += made
        count -= len(made)
    cluster.record_costs(created)
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
        confirm(f"The head node {node.id} differs from the config (node_config changed); "
                "replace it?", yes)
        say(f"terminating head {node.id} (node_config changed)")
        cluster.provider.terminate_nodes([node.id])
        cluster.state.add_event(name, "terminated head: node_config changed", node=node.id)
        result.terminated.append(node.id)
    if head is None:
        say(f"creating head node ({head_type})")
        pricing = Pricing(config, cluster.provider)
        option = next_option(pricing.type_info(head_type), [], time.time())
        spec, price_tags = pricing.launch(head_type, option)
        head = cluster.provider.create_nodes(
            spec, 1, {**cluster.new_tags(HEAD, head_type), **price_tags},
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
        say(f"{'setting up' if setup else 'restarting'} head {cluster.label(head)}")
        address = bootstrap.bootstrap_node(cluster, head, head_address=None, setup=setup,
                                           restart=restart)
        result.bootstrapped.append(head.id)
        if address:
            result.head_address = address
    if not result.head_address:
        result.head_address = cluster.head_address(head)
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

    pool = ThreadPoolExecutor(min(PARALLEL_BOOTSTRAPS, len(jobs)))
    try:
        return [e for e in pool.map(one, jobs) if e]
    except BaseException:  # Ctrl-C: end the setups in flight instead of waiting for them
        abort_running()    # (their nodes stay tagged setting-up: the next `up` redoes them)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- down
DOWN_SWEEP_INTERVAL_S = 1.0
DOWN_SWEEP_GRACE_S = 20.0   # how long `down` watches for stray launches if the monitor
                            # could not be confirmed stopped
DOWN_SWEEP_LIMIT_S = 300.0  # give up (with an error) if nodes keep appearing this long


def down(config_path: str | os.PathLike, yes: bool = False,
         workers_only: bool = False, force: bool = False) -> list[str]:
    """Terminate the cluster's nodes (found by tags) and forget it; returns node ids.

    Nothing may be launched behind ``down``'s back, so the order is: tag the head as
    going down (the autoscaler launches nothing for such a cluster, wherever it runs),
    stop the monitor and wait for it, terminate, then list the cluster again and
    terminate whatever appeared meanwhile until a listing comes back empty. Also cleans
    up after a half-failed ``up``; nodes that cannot be reached are still terminated at
    the provider (SSH hosts: their claim is released, stopping strato there is best
    effort). ``workers_only`` keeps the head and the local state, and starts the monitor
    again with ``min_workers`` 0 until the next ``up``.

    Only this owner's nodes are touched. When the cluster name has only another owner's
    nodes ``down`` refuses (``OwnerConflictError``); ``force`` terminates those too (e.g.
    after losing the ``$STRATO_HOME`` that launched them).
    """
    cluster = open_cluster(config_path)
    if workers_only and cluster.provider.needs_prepare_to_reach_nodes and not cluster.facts:
        cluster.prepare()  # the key to reach the head (to stop its monitor)
    name = cluster.name
    nodes = cluster.nodes(alive_only=False)
    foreign = cluster.foreign_nodes()
    if foreign and force:
        say(f"[yellow]--force: also terminating {len(foreign)} node(s) of another owner[/]")
        nodes += foreign
    elif foreign and not any(n.is_alive for n in nodes):
        raise cluster.owner_conflict(foreign, "terminate them", "terminate them anyway")
    elif foreign:
        say(f"[yellow]{len(foreign)} node(s) named {name!r} of another owner are left "
            "alone (`down --force` terminates them too)[/]")
    targets = [n for n in nodes if not workers_only or n.kind != HEAD]
    what = "the workers of" if workers_only else "every node of"
    confirm(f"Terminate {what} cluster {name!r} ({len(targets)} node(s))?", yes)
    heads = [n for n in nodes if n.kind == HEAD]
    head = next((n for n in heads if n.is_alive), None)
    mark = GoingDown.WORKERS if workers_only else GoingDown.ALL
    stopped = True
    if head is not None:
        _mark_going_down(cluster, head, mark.value)
    if head is not None or (heads and cluster.monitor_mode == "local"):
        stopped = stop_monitor(cluster, head or heads[0],
                               connect_timeout=DOWN_CONNECT_TIMEOUT)
    cluster.record_costs(targets)
    if targets:
        say(f"terminating {len(targets)} node(s): {', '.join(cluster.label(n) for n in targets)}")
        cluster.provider.terminate_nodes([n.id for n in targets])
    done = {n.id for n in targets}
    strays = _sweep(cluster, done, workers_only=workers_only,
                    grace=0.0 if stopped else DOWN_SWEEP_GRACE_S)
    if strays:
        say(f"[yellow]terminated {len(strays)} node(s) launched while going down: "
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
                start_monitor(cluster, head, record.head_address,
                               {t: 0 for t in cluster.config.available_node_types})
                say("workers terminated; the autoscaler runs on with min_workers 0 (it "
                    "launches for demand only) until `strato up` restores min_workers")
                return ids
        say("workers terminated; `strato up` starts min_workers and the monitor again")
        return ids
    _forget(cluster)
    say(f"cluster [bold]{name}[/] is down")
    return ids


def _tag_owner(cluster: Cluster) -> None:
    """Give this owner's nodes from before owner tags the tag (``Cluster.owns``)."""
    for node in cluster.nodes(alive_only=False):
        if not node.tags.get(TAG_OWNER):
            cluster.provider.set_tags(node.id, {TAG_OWNER: cluster.owner})


def _mark_going_down(cluster: Cluster, head: Node, value: str) -> None:
    """Tag the head so that no autoscaler launches for this cluster ('' clears it)."""
    if head.tags.get(TAG_GOING_DOWN, "") == value:
        return
    try:
        cluster.provider.set_tags(head.id, {TAG_GOING_DOWN: value})
    except Exception as e:  # the head may be half gone; the sweep below still runs
        say(f"[yellow]could not tag head {head.id} as going down: {e}[/]")


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
    forget_host_keys(cluster.host_keys_path())  # new machines may get these addresses
    shutil.rmtree(cluster.state.home / "monitor" / cluster.name, ignore_errors=True)
