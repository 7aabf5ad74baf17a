"""The autoscaler loop: read the world, ``plan()`` it, apply the plan, log every reason.

Kept thin on purpose: every decision is made by the pure ``plan``; this module only runs
the tick and carries out the resulting ``Plan`` (drains, terminations, setup retries,
launches, warnings said once). Its parts live beside it:

- ``observe``: the provider's machines and the head's view as ``plan``'s ``NodeInfo``s,
  with dead machines (preempted, stopped, runtime lost) to terminate;
- ``launching``: creating machines (next zone, then on-demand on capacity errors, in the
  same tick) and bootstrapping them in threads;
- ``instances``: each machine's ``Instance`` record, changed only along
  ``lifecycle.ALLOWED``;
- ``head_view``: how the head is asked (``RuntimeView``, ``HeadRuntime``).

The head's view, the bootstrapper and the clock are injected, so tests run ``tick()``
against moto with a stub head and no SSH. Events go to an ``EventLog`` (JSON lines) that
``strato status`` shows as recent events.

With ``autostop`` set, a tick that finds the cluster idle for that long (``activity()``,
see ``autostop``) tears the whole cluster down instead of planning, and the loop ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato.launcher.autoscaler import autostop
from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.head_view import RuntimeView
from strato.launcher.autoscaler.instances import Instances
from strato.launcher.autoscaler.launching import Bootstrapper, Launcher
from strato.launcher.autoscaler.lifecycle import ALLOWED, NodeState
from strato.launcher.autoscaler.observe import Dead, Observer
from strato.launcher.autoscaler.plan import plan
from strato.launcher.autoscaler.records import HEAD, NodeTypeInfo, Plan, Snapshot, demand_from_head
from strato.launcher.config import AutostopConfig
from strato.launcher.pricing import Pricing
from strato.providers.base import TAG_GOING_DOWN, TAG_KIND, GoingDown, Node

if TYPE_CHECKING:  # typing only: cluster.py imports the launcher's heavier modules
    from strato.launcher.cluster import Cluster

__all__ = ["Autoscaler"]


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
        self.instances = Instances(clock)  # by provider node id, TERMINATED kept
        self.last_warnings: set[str] = set()
        self.held: str | None = None   # why the last tick did nothing (cluster going down)
        self.stop = threading.Event()
        self._lock = threading.RLock()
        self.observer = Observer(cluster, self.instances, self.events,
                                 lost_grace_s=self.lost_grace_s, ticks=lambda: self.ticks)
        self.launcher = Launcher(cluster, self.instances, self.events, lock=self._lock,
                                 clock=clock, ticks=lambda: self.ticks,
                                 bootstrapper=bootstrapper, head_address=head_address)
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

    def snapshot(self) -> tuple[Snapshot, dict[str, Node], dict[str, Mapping[str, Any]], Dead]:
        """Read the head and the provider: the Snapshot plus what applying it needs."""
        now = self.clock()
        view = self.runtime.view()
        infos, machines, runtime_nodes, dead = self.observer.observe(view, now)
        demand, gangs = demand_from_head((view or {}).get("demand", []))
        config = self.config
        snap = Snapshot(
            now=now, node_types=self.node_types(), nodes=infos, demand=demand, gangs=gangs,
            max_workers=config.max_workers, upscaling_speed=config.upscaling_speed,
            idle_timeout_s=config.idle_timeout_minutes * 60.0,
            backoffs=list(self.launcher.backoffs),
            max_setup_failures=config.autoscaler.max_launch_failures)
        return snap, machines, runtime_nodes, dead

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
            inflight = self.launcher.inflight
            for info in snap.nodes:  # nodes created but never set up (a crashed bootstrap)
                if info.state == NodeState.ALLOCATED and info.id not in inflight and \
                        info.id in machines and not self._terminated(decision, info.id):
                    self.launcher.start_bootstrap(machines[info.id], setup=True,
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
        if setting is None or not self.can_create or self.launcher.inflight:
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
                self.instances.set_state(rec, NodeState.TERMINATING)
        self.stop.set()
        return True

    def _terminated(self, decision: Plan, node_id: str) -> bool:
        return any(t.node_id == node_id for t in decision.terminate)

    def _handle_dead(self, dead: Dead) -> None:
        if not self.can_create:  # SSH hosts: restart the runtime in place
            for node, why in dead:
                self.instances[node.id].missing_since = None
                if node.id not in self.launcher.inflight:
                    self.launcher.start_bootstrap(node, setup=False, why=f"restart runtime: {why}")
            return
        for node, why in dead:
            self.events.record("terminate", f"dead worker: {why}", node=node.id,
                               node_type=node.node_type, tick=self.ticks)
            self.instances.move(node.id, NodeState.TERMINATING)
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
                self.instances.move(t.node_id, NodeState.TERMINATING)
            self.provider.terminate_nodes([t.node_id for t in decision.terminate])
        for r in decision.retry_setup:
            node = machines.get(r.node_id)
            if node is not None and r.node_id not in self.launcher.inflight:
                self.launcher.start_bootstrap(node, setup=True, why=f"retry setup: {r.reason}")
        if self.can_create:
            for launch in decision.launch:
                self.launcher.launch(launch, self.node_types()[launch.node_type], snap.now,
                                     self._hold)
        warnings = set(decision.warnings)
        for w in sorted(warnings - self.last_warnings):  # say each once, not every tick
            self.events.record("warning", w, tick=self.ticks)
        self.last_warnings = warnings


    # ------------------------------------------------------------ running
    def wait_for_bootstraps(self, timeout: float = 60.0) -> None:
        """Block until every running bootstrap has finished (tests, shutdown)."""
        self.launcher.wait_for_bootstraps(timeout)

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
        self.launcher.close()
