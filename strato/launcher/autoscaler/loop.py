"""The autoscaler loop: read the world, ``plan()`` it, apply the plan, log every reason.

Kept thin on purpose: every decision is made by the pure ``plan``; this module only turns
the provider's machines and the head's runtime view into a ``Snapshot`` and carries out
the resulting ``Plan``:

- launches go to ``next_option``'s (instance type, zone, spot); a ``CapacityError`` backs that
  (type, zone, spot) off and the *same tick* tries the next zone, then on-demand when the
  type allows it, so a capacity error costs no extra tick;
- launched nodes are bootstrapped in threads (a tick never waits minutes for SSH);
  failed setups are retried after a growing delay, then given up (``plan`` terminates
  and replaces them at ``max_setup_failures``);
- machines the cloud took back (spot preemption), stopped machines (a crashed local
  runtime) and workers whose runtime vanished from the head (missed heartbeats) for
  longer than a grace period are terminated and counted as gone, so ``plan`` replaces
  them while ``min_workers`` or demand needs them.

Each machine's lifecycle lives in one stored ``Instance`` record (state, since, setup
failures, next retry), changed only by events as they happen, each transition checked
against ``lifecycle.ALLOWED``: launch requested (QUEUED -> REQUESTED, back to QUEUED on a
capacity error), provider reported it (ALLOCATED), bootstrap started / finished / failed
(SETTING_UP, RUNNING, SETUP_FAILED), the head reports it draining (DRAINING), terminate
requested (TERMINATING), gone from the provider (TERMINATED). Machines the loop did not
launch (the head, workers set up by ``up``, a restarted monitor) are adopted once from
their status tag. A tick reads records; it never re-derives them.

The head's view, the bootstrapper and the clock are injected, so tests run ``tick()``
against moto with a stub head and no SSH. Events go to an ``EventLog`` (JSON lines) that
``strato status`` shows as recent events.

With ``autostop`` set, a tick that finds the cluster idle for that long (``activity()``,
see ``autostop``) tears the whole cluster down instead of planning, and the loop ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from strato.exceptions import CapacityError, HeadUnreachableError, LauncherError
from strato.launcher.autoscaler import autostop
from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.lifecycle import ALLOWED, NodeState, check_transition
from strato.launcher.autoscaler.plan import (
    HEAD,
    WORKER,
    Launch,
    NodeInfo,
    NodeTypeInfo,
    Plan,
    Snapshot,
    TypeBackoff,
    backoff_delay,
    clear_backoff,
    demand_from_head,
    next_option,
    plan,
    record_capacity_failure,
)
from strato.launcher.bootstrap import TAG_NODE_ID_LABEL
from strato.launcher.config import AutostopConfig
from strato.launcher.pricing import Pricing
from strato.providers.base import (
    TAG_GOING_DOWN,
    TAG_KIND,
    TAG_STATUS,
    GoingDown,
    Node,
    NodeStatus,
)
from strato.providers.base import NodeState as MachineState
from strato.runtime.head_client import HeadClient

if TYPE_CHECKING:  # typing only: cluster.py imports the launcher's heavier modules
    from strato.launcher.cluster import Cluster

__all__ = ["Autoscaler", "HeadRuntime", "RuntimeView", "setup_retry_delay"]

PARALLEL_BOOTSTRAPS = 16
SETUP_RETRY_BASE_S = 10.0
SETUP_RETRY_CAP_S = 300.0

Bootstrapper = Callable[[Node, bool], None]  # (node, run setup?) -> raises on failure


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


def setup_retry_delay(failures: int) -> float:
    """Wait before the next setup attempt after ``failures`` failed ones: 10 s, x2, <= 5 min."""
    return min(SETUP_RETRY_BASE_S * 2 ** max(failures - 1, 0), SETUP_RETRY_CAP_S)


@dataclass
class Instance:
    """The loop's record of one machine: the truth about where it is in its life."""

    state: NodeState
    since: float                      # when it entered ``state``
    node_type: str = ""
    failures: int = 0                 # setup attempts failed in a row
    retry_at: float | None = None     # when a failed setup may be tried again
    missing_since: float | None = None  # set up, but not (or no longer) alive at the head
    preempted: bool = False           # the cloud took (or is taking) it back


class Autoscaler:
    """One cluster's autoscaler; ``tick()`` is one pass, ``run()`` loops until stopped."""

    def __init__(self, cluster: Cluster, *, runtime: RuntimeView,
                 bootstrapper: Bootstrapper | None = None, events: EventLog | None = None,
                 head_address: str | None = None, min_workers: Mapping[str, int] | None = None,
                 clock: Callable[[], float] = time.time,
                 lost_grace_s: float | None = None,
                 autostop: AutostopConfig | None = None,
                 autostop_file: Path | None = None) -> None:
        self.cluster = cluster
        self.config = cluster.config
        self.provider = cluster.provider
        self.runtime = runtime
        self.head_address = head_address
        self.bootstrapper = bootstrapper or self._bootstrap_node
        self.events = events or EventLog(
            cluster.state.log_dir(cluster.name) / "autoscaler-events.jsonl")
        self.min_workers = dict(min_workers or {})
        self.clock = clock
        self.tick_seconds = self.config.autoscaler.tick_seconds
        self.lost_grace_s = lost_grace_s if lost_grace_s is not None else \
            max(5.0, 3 * self.tick_seconds)
        # a fixed pool (SSH hosts): never claim or release, only restart runtimes
        self.can_create = cluster.provider.can_create_nodes
        self.ticks = 0
        self.backoffs: list[TypeBackoff] = []
        self.instances: dict[str, Instance] = {}  # by provider node id, TERMINATED kept
        self.inflight: dict[str, Future[None]] = {}
        self.last_warnings: set[str] = set()
        self.held: str | None = None   # why the last tick did nothing (cluster going down)
        self.stop = threading.Event()
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(PARALLEL_BOOTSTRAPS, thread_name_prefix="bootstrap")
        self._types: dict[str, NodeTypeInfo] | None = None
        # autostop: the config's (or this) setting, unless ``autostop_file`` (written by
        # ``init(autostop=...)``) says otherwise; the idle clock starts with the loop
        self.autostop_default = autostop if autostop is not None else self.config.autostop
        self.autostop_file = autostop_file
        self.started_at = clock()
        self.autostopped: list[str] | None = None  # the nodes an autostop took down

    # ------------------------------------------------------------ the world
    def node_types(self) -> dict[str, NodeTypeInfo]:
        """The config's node types as ``plan`` sees them (resources asked of the provider)."""
        if self._types is None:
            # resources, prices and (types named by GPU) launch options, cheapest first
            pricing = Pricing(self.config, self.provider)
            self._types = {name: pricing.type_info(name, self.min_workers.get(name,
                                                                              nt.min_workers))
                           for name, nt in self.config.available_node_types.items()}
        return self._types

    def _runtime_nodes(self, view: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
        """Runtime nodes by the provider node id in their labels (alive ones win)."""
        out: dict[str, Mapping[str, Any]] = {}
        for rt in (view or {}).get("nodes", []):
            node_id = (rt.get("labels") or {}).get(TAG_NODE_ID_LABEL)
            if node_id and (node_id not in out or rt.get("alive")):
                out[node_id] = rt
        return out

    def _record(self, node: Node) -> Instance:
        """The machine's record; one it has no record of is adopted from its status tag
        (RUNNING if set up, SETUP_FAILED if its setup failed, else ALLOCATED: to set up)."""
        rec = self.instances.get(node.id)
        gone = node.state == MachineState.TERMINATED
        if rec is not None and (gone or rec.state != NodeState.TERMINATED):
            return rec
        # unknown, or a new life under an old id (an SSH host claimed again)
        status = node.tags.get(TAG_STATUS)
        if gone:
            state = NodeState.TERMINATED
        elif status == NodeStatus.UP_TO_DATE.value:
            state = NodeState.RUNNING
        elif status == NodeStatus.UPDATE_FAILED.value:
            state = NodeState.SETUP_FAILED
        else:
            state = NodeState.ALLOCATED
        rec = Instance(state, since=self.clock(), node_type=node.node_type or "",
                       failures=1 if state == NodeState.SETUP_FAILED else 0)
        self.instances[node.id] = rec
        return rec

    def _node_info(self, node: Node, rt: Mapping[str, Any] | None, has_view: bool,
                   now: float, dead: list[tuple[Node, str]]) -> NodeInfo | None:
        """One machine as ``plan`` sees it, from its record after this listing's events;
        dead ones go to ``dead`` to be terminated (or restarted in place)."""
        kind = HEAD if node.kind == HEAD else WORKER
        base: dict[str, Any] = dict(
            id=node.id, node_type=node.node_type or "", kind=kind, spot=node.spot,
            preempted=node.preempted, launch_hash_current=self.cluster.launch_hash_current(node))
        gone = NodeInfo(state=NodeState.TERMINATED, **base)
        was_terminated = node.id in self.instances and \
            self.instances[node.id].state == NodeState.TERMINATED
        rec = self._record(node)
        if node.preempted:
            self._note_preempted(node, rec)
        if node.state == MachineState.TERMINATED:  # event: gone
            if was_terminated:
                return None  # plan was told once
            self._move(node.id, NodeState.TERMINATED)
            return gone
        if rec.state == NodeState.TERMINATING:  # asked to go; the provider is on it
            return NodeInfo(state=NodeState.TERMINATING, **base)
        if kind == WORKER and node.state in (MachineState.STOPPED, MachineState.STOPPING) \
                and not (node.preempted and node.state == MachineState.STOPPING):
            why = ("its runtime process died" if self.cluster.is_local
                   else f"the machine is {node.state.value}")
            dead.append((node, "preempted by the cloud" if node.preempted else why))
            return gone
        # A preempted worker still STOPPING is in its shutdown grace (checkpoint hooks run):
        # never cut it short. It goes on below as a live node that ``plan`` replaces at
        # once and drains (or terminates if idle); the cloud stops it when the grace ends.
        if rec.state == NodeState.SETUP_FAILED:
            return NodeInfo(state=NodeState.SETUP_FAILED, setup_failures=rec.failures,
                            setup_retry_at=rec.retry_at, **base)
        if rec.state not in (NodeState.RUNNING, NodeState.DRAINING):
            return NodeInfo(state=rec.state, **base)  # ALLOCATED: set up below; SETTING_UP
        if not has_view:  # the head cannot be asked: keep everything, assume busy
            return NodeInfo(state=rec.state, draining=rec.state == NodeState.DRAINING,
                            available={} if kind == HEAD else None, **base)
        if rt is None or not rt.get("alive"):
            if kind == HEAD:
                return NodeInfo(state=NodeState.RUNNING, available={}, **base)
            if rec.missing_since is None:
                rec.missing_since = now
            if now - rec.missing_since < self.lost_grace_s:
                return NodeInfo(state=rec.state, **base)
            dead.append((node, f"runtime lost: gone from the head for "
                               f"{now - rec.missing_since:.0f}s (missed heartbeats or crashed)"))
            return gone
        rec.missing_since = None  # event: its runtime is (back) at the head
        draining = bool(rt.get("draining"))  # event: the head drains it (or stopped)
        self._move(node.id, NodeState.DRAINING if draining else NodeState.RUNNING)
        idle = float(rt.get("idle_seconds") or 0.0)
        return NodeInfo(
            state=rec.state, draining=draining,
            idle_since=now - idle if idle > 0 else None,
            available=dict(rt.get("available") or {}),
            has_actors=int(rt.get("num_actors") or 0) > 0,
            holds_primary_objects=float(rt.get("object_store_used") or 0) > 0, **base)

    def _gone_unlisted(self, listed: set[str]) -> None:
        """Event: machines asked to terminate that the provider no longer lists are gone."""
        for node_id, rec in self.instances.items():
            if rec.state == NodeState.TERMINATING and node_id not in listed:
                self._move(node_id, NodeState.TERMINATED)

    def snapshot(self) -> tuple[Snapshot, dict[str, Node], dict[str, Mapping[str, Any]],
                                list[tuple[Node, str]]]:
        """Read the head and the provider: the Snapshot plus what applying it needs."""
        now = self.clock()
        view = self.runtime.view()
        runtime_nodes = self._runtime_nodes(view)
        machines = self.cluster.machines(include_terminated=True)
        dead: list[tuple[Node, str]] = []
        infos = []
        for m in machines:
            info = self._node_info(m, runtime_nodes.get(m.id), view is not None, now, dead)
            if info is not None:
                infos.append(info)
        self._gone_unlisted({m.id for m in machines})
        demand, gangs = demand_from_head((view or {}).get("demand", []))
        config = self.config
        snap = Snapshot(
            now=now, node_types=self.node_types(), nodes=infos, demand=demand, gangs=gangs,
            max_workers=config.max_workers, upscaling_speed=config.upscaling_speed,
            idle_timeout_s=config.idle_timeout_minutes * 60.0, backoffs=list(self.backoffs),
            max_setup_failures=config.autoscaler.max_launch_failures)
        return snap, {m.id: m for m in machines}, runtime_nodes, dead

    # ------------------------------------------------------------ one tick
    def tick(self) -> Plan:
        """Read, decide, apply; returns the plan this tick carried out."""
        with self._lock:
            self.ticks += 1
            snap, machines, runtime_nodes, dead = self.snapshot()
            if self._hold(machines.values()):
                return Plan()
            if self._autostop(snap.now):
                return Plan()
            if dead:
                self._handle_dead(dead)
            decision = plan(snap)
            self._apply(decision, snap, machines, runtime_nodes)
            for info in snap.nodes:  # nodes created but never set up (a crashed bootstrap)
                if info.state == NodeState.ALLOCATED and info.id not in self.inflight and \
                        info.id in machines and not self._terminated(decision, info.id):
                    self._start_bootstrap(machines[info.id], setup=True,
                                          why="created but never set up")
            return decision

    def _hold(self, machines: Iterable[Node] | None = None) -> bool:
        """Whether this cluster is going away, so nothing may be launched or set up.

        True while no head machine is alive (gone, terminating, stopped) or ``down``
        has tagged the head ``TAG_GOING_DOWN``; for a whole-cluster ``down`` the loop
        also stops. ``machines`` is this tick's listing; None lists the heads afresh
        (the last check right before a launch).
        """
        if machines is None:
            machines = self.cluster.machines({TAG_KIND: HEAD})
        heads = [m for m in machines if m.kind == HEAD and m.is_alive]
        mark = next((m.tags.get(TAG_GOING_DOWN) for m in heads
                     if m.tags.get(TAG_GOING_DOWN)), None)
        if not heads:
            why = "the head node is gone or shutting down: nothing is launched"
        elif mark == GoingDown.ALL.value:
            why = "`strato down` is removing the cluster: the autoscaler stops"
        elif mark:
            why = "`strato down --workers-only` is running: nothing is launched until it ends"
        else:
            why = None
        if why and why != self.held:
            self.events.record("hold", why, tick=self.ticks)
        self.held = why
        if mark == GoingDown.ALL.value:
            self.stop.set()
        return why is not None

    def autostop_setting(self) -> AutostopConfig | None:
        """The autostop in effect: ``init(autostop=...)``'s override, else the config's."""
        return autostop.read_override(self.autostop_file, self.autostop_default)

    def _autostop(self, now: float) -> bool:
        """Tear the cluster down if it has been idle for the autostop time; the loop ends."""
        setting = self.autostop_setting()
        if setting is None or not self.can_create or self.inflight:
            return False  # nodes being set up are not idle
        activity = getattr(self.runtime, "activity", None)
        idle = autostop.idle_seconds(activity() if activity else None, self.started_at, now)
        if idle is None or autostop.remaining(setting, idle) > 0:
            return False
        self.autostopped = autostop.teardown(self.cluster, setting, idle, self.events,
                                             tick=self.ticks)
        for node_id in self.autostopped:
            rec = self.instances.get(node_id)
            if rec is not None and NodeState.TERMINATING in ALLOWED.get(rec.state, ()):
                self._set_state(rec, NodeState.TERMINATING)
        self.stop.set()
        return True

    def _note_preempted(self, node: Node, rec: Instance) -> None:
        """Event: preempted. Logged once, as soon as the provider reports it (GCE: from its
        ``compute.instances.preempted`` operation, while the VM is still stopping)."""
        if rec.preempted:
            return
        rec.preempted = True
        what = {MachineState.TERMINATED: "reclaimed", MachineState.STOPPED: "stopped"}.get(
            node.state, "is reclaiming")
        grace = "; it keeps running through its shutdown grace" if \
            node.state == MachineState.STOPPING else ""
        self.events.record("preempted", f"the cloud {what} this spot node{grace}",
                           node=node.id, node_type=node.node_type, zone=node.zone,
                           tick=self.ticks)

    def _terminated(self, decision: Plan, node_id: str) -> bool:
        return any(t.node_id == node_id for t in decision.terminate)

    def _handle_dead(self, dead: list[tuple[Node, str]]) -> None:
        if not self.can_create:  # SSH hosts: restart the runtime in place
            for node, why in dead:
                self.instances[node.id].missing_since = None
                if node.id not in self.inflight:
                    self._start_bootstrap(node, setup=False, why=f"restart runtime: {why}")
            return
        for node, why in dead:
            self.events.record("terminate", f"dead worker: {why}", node=node.id,
                               node_type=node.node_type, tick=self.ticks)
            self._move(node.id, NodeState.TERMINATING)
        self.provider.terminate_nodes([n.id for n, _ in dead])

    def _apply(self, decision: Plan, snap: Snapshot, machines: Mapping[str, Node],
               runtime_nodes: Mapping[str, Mapping[str, Any]]) -> None:
        for d in decision.drain:
            rt = runtime_nodes.get(d.node_id)
            if rt is None:
                continue
            try:
                self.runtime.drain(str(rt["node_id"]), d.reason)
            except Exception as e:
                self.events.record("error", f"drain failed: {e}", node=d.node_id)
                continue
            self.events.record("drain", d.reason, node=d.node_id, tick=self.ticks)
        if self.can_create and decision.terminate:
            for t in decision.terminate:
                self.events.record("terminate", t.reason, node=t.node_id, tick=self.ticks)
                self._move(t.node_id, NodeState.TERMINATING)
            self.provider.terminate_nodes([t.node_id for t in decision.terminate])
        for r in decision.retry_setup:
            node = machines.get(r.node_id)
            if node is not None and r.node_id not in self.inflight:
                self._start_bootstrap(node, setup=True, why=f"retry setup: {r.reason}")
        if self.can_create:
            for launch in decision.launch:
                self._launch(launch, snap.now)
        warnings = set(decision.warnings)
        for w in sorted(warnings - self.last_warnings):  # say each once, not every tick
            self.events.record("warning", w, tick=self.ticks)
        self.last_warnings = warnings

    # ------------------------------------------------------------ launching
    def _launch(self, launch: Launch, now: float) -> list[Node]:
        """Create the nodes, moving to the next zone / on-demand on capacity errors."""
        t = launch.node_type
        info = self.node_types()[t]
        pricing = Pricing(self.config, self.provider)
        # one QUEUED record per node asked for; it gets a provider id once allocated
        queued = [Instance(NodeState.QUEUED, since=now, node_type=t)
                  for _ in range(launch.count)]
        option = next_option(info, self.backoffs, now)
        while option is not None:
            zone, spot, itype = option.zone, option.spot, option.instance_type
            where = (f"{itype + ' ' if itype else ''}{'spot' if spot else 'on-demand'} in "
                     f"{zone or 'the default zone'}")
            spec, price_tags = pricing.launch(t, option)
            if self._hold():  # `down` may have begun since this tick's listing
                break
            for rec in queued:  # event: launch requested
                self._set_state(rec, NodeState.REQUESTED)
            try:
                created = self.provider.create_nodes(spec, launch.count,
                                                     {**self.cluster.new_tags(WORKER, t),
                                                      **price_tags},
                                                     zone=zone, spot=spot)
            except CapacityError as e:
                self.backoffs = record_capacity_failure(self.backoffs, t, zone, spot, now,
                                                        instance_type=itype)
                failures = max(b.failures for b in self.backoffs
                               if (b.node_type, b.zone, b.spot, b.instance_type)
                               == (t, zone, spot, itype))
                self.events.record(
                    "capacity-error", f"{launch.count} x {t} {where}: {e.code or e}; "
                    f"backed off {backoff_delay(failures):.0f}s", node_type=t, zone=zone,
                    spot=spot, code=e.code, tick=self.ticks)
                for rec in queued:  # back to the queue for the next zone / on-demand
                    self._set_state(rec, NodeState.QUEUED)
                nxt = next_option(info, self.backoffs, now)
                if nxt is None:
                    self.events.record(
                        "launch-failed", f"{launch.count} x {t}: no capacity anywhere it may "
                        "run; retried when the backoff ends", node_type=t, tick=self.ticks)
                elif spot and not nxt.spot:
                    self.events.record(
                        "fallback", f"{t}: no spot capacity in any zone; falling back to "
                        "on-demand", node_type=t, tick=self.ticks)
                option = nxt
                continue
            except LauncherError as e:  # not capacity: back off (no tight loop), say why
                self.backoffs = record_capacity_failure(self.backoffs, t, zone, spot, now,
                                                        instance_type=itype)
                self.events.record("launch-failed", f"{launch.count} x {t} {where}: "
                                   f"{str(e).splitlines()[0]}", node_type=t, tick=self.ticks)
                break
            self.backoffs = clear_backoff(self.backoffs, t, zone, spot, instance_type=itype)
            ids = [n.id for n in created]
            reason = launch.reason
            if info.spot and not spot and "fallback to on-demand" not in reason:
                reason += "; fallback to on-demand: no spot capacity in any zone"
            self.events.record("launch", f"{len(created)} x {t} {where}: {reason}",
                               node_type=t, zone=zone, spot=spot, nodes=ids, tick=self.ticks)
            for n, rec in zip(created, queued):  # event: the provider allocated it
                self._set_state(rec, NodeState.ALLOCATED)
                self.instances[n.id] = rec
                self._start_bootstrap(n, setup=True, why=None)
            for rec in queued[len(created):]:  # the provider made fewer: dropped
                self._set_state(rec, NodeState.TERMINATED)
            return created
        for rec in queued:  # no zone left (backed off), an error, or going down: dropped
            self._set_state(rec, NodeState.TERMINATED)
        return []

    # ------------------------------------------------------------ bootstrapping
    def _bootstrap_node(self, node: Node, setup: bool) -> None:
        from strato.launcher import bootstrap

        bootstrap.bootstrap_node(self.cluster, node, head_address=self.head_address,
                                 setup=setup, restart=True)

    def _start_bootstrap(self, node: Node, *, setup: bool, why: str | None) -> None:
        if why:
            self.events.record("setup", why, node=node.id, tick=self.ticks)
        rec = self._record(node)
        if not setup:  # a runtime restart in place (SSH hosts): a fresh start
            rec.failures, rec.retry_at, rec.missing_since = 0, None, None
        self._move(node.id, NodeState.SETTING_UP)  # event: bootstrap started
        started = self.clock()
        future = self._pool.submit(self.bootstrapper, node, setup)
        self.inflight[node.id] = future
        future.add_done_callback(lambda f: self._bootstrap_done(node, f, started))

    def _bootstrap_done(self, node: Node, future: Future[None], started: float) -> None:
        with self._lock:
            self.inflight.pop(node.id, None)
            rec = self.instances.get(node.id)
            if rec is None or rec.state != NodeState.SETTING_UP:
                return  # terminated meanwhile
            error = future.exception()
            took = self.clock() - started
            if error is None:  # event: bootstrap finished
                rec.failures, rec.retry_at = 0, None
                self._move(node.id, NodeState.RUNNING)
                self.events.record("ready", f"set up and running after {took:.1f}s",
                                   node=node.id, tick=self.ticks)
                return
            rec.failures += 1  # event: bootstrap failed
            rec.retry_at = self.clock() + setup_retry_delay(rec.failures)
            self._move(node.id, NodeState.SETUP_FAILED)
            first = (str(error).splitlines() or [type(error).__name__])[0]
            self.events.record("setup-failed", f"attempt {rec.failures} failed after "
                               f"{took:.1f}s: {first}", node=node.id, tick=self.ticks)

    def wait_for_bootstraps(self, timeout: float = 60.0) -> None:
        """Block until every running bootstrap has finished (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self.inflight.values())
            if not pending:
                return
            for f in pending:
                with contextlib.suppress(Exception):
                    f.result(timeout=max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} bootstrap(s) still running")

    # ------------------------------------------------------------ lifecycle bookkeeping
    def _move(self, node_id: str, new: NodeState) -> None:
        """Event: the machine's record enters ``new`` (checked against ALLOWED)."""
        self._set_state(self.instances[node_id], new)

    def _set_state(self, rec: Instance, new: NodeState) -> None:
        if rec.state == new:
            return
        check_transition(rec.state, new)
        rec.state, rec.since = new, self.clock()
        if new == NodeState.TERMINATED:
            rec.missing_since = None

    # ------------------------------------------------------------ running
    def run(self) -> None:
        """Tick every ``tick_seconds`` until ``stop`` is set; errors are logged, not fatal."""
        while not self.stop.is_set():
            try:
                self.tick()
            except Exception as e:
                self.events.record("error", f"tick {self.ticks} failed: "
                                   f"{type(e).__name__}: {e}")
            self.stop.wait(self.tick_seconds)

    def close(self) -> None:
        """Stop the loop and let running bootstraps finish in the background."""
        self.stop.set()
        self._pool.shutdown(wait=False)
