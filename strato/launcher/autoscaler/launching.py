"""Getting machines for the loop: create them, then set them up, without stalling a tick.

- a launch goes to ``next_option``'s (instance type, zone, spot); a ``CapacityError``
  backs that (type, zone, spot) off and the *same tick* tries the next zone, then
  on-demand when the type allows it, so a capacity error costs no extra tick;
- created nodes are bootstrapped in threads (a tick never waits minutes for SSH);
  a failed setup is retried after a growing delay (``setup_retry_delay``), then given up
  (``plan`` terminates and replaces it at ``max_setup_failures``).

Each step is an event on the machine's ``Instance`` record and a line in the event log.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from strato.exceptions import CapacityError, LauncherError
from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.instances import Instance, Instances, setup_retry_delay
from strato.launcher.autoscaler.lifecycle import NodeState
from strato.launcher.autoscaler.options import (
    backoff_delay,
    clear_backoff,
    next_option,
    record_capacity_failure,
)
from strato.launcher.autoscaler.records import WORKER, Launch, NodeTypeInfo, TypeBackoff
from strato.launcher.pricing import Pricing
from strato.providers.base import Node

if TYPE_CHECKING:  # typing only: cluster.py imports the launcher's heavier modules
    from strato.launcher.cluster import Cluster

__all__ = ["Bootstrapper", "Launcher"]

PARALLEL_BOOTSTRAPS = 16

Bootstrapper = Callable[[Node, bool], None]  # (node, run setup?) -> raises on failure


class Launcher:
    """Creates and bootstraps one cluster's machines for its autoscaler loop.

    ``backoffs`` (capacity errors by type, zone, spot) and ``inflight`` (bootstraps
    running) are read by the loop; ``lock`` is the loop's, so a finished bootstrap never
    changes a record in the middle of a tick; ``ticks`` gives the tick number for events.
    """

    def __init__(self, cluster: Cluster, instances: Instances, events: EventLog, *,
                 lock: threading.RLock, clock: Callable[[], float],
                 ticks: Callable[[], int], bootstrapper: Bootstrapper | None = None,
                 head_address: str | None = None) -> None:
        self.cluster = cluster
        self.instances = instances
        self.events = events
        self.clock = clock
        self.ticks = ticks
        self.head_address = head_address
        self.bootstrapper = bootstrapper or self._bootstrap_node
        self.backoffs: list[TypeBackoff] = []
        self.inflight: dict[str, Future[None]] = {}
        self._lock = lock
        self._pool = ThreadPoolExecutor(PARALLEL_BOOTSTRAPS, thread_name_prefix="bootstrap")

    # ------------------------------------------------------------ launching
    def launch(self, launch: Launch, info: NodeTypeInfo, now: float,
               hold: Callable[[], bool]) -> list[Node]:
        """Create the nodes, moving to the next zone / on-demand on capacity errors;
        ``hold()`` (asked right before creating) says the cluster is going away."""
        t = launch.node_type
        provider = self.cluster.provider
        pricing = Pricing(self.cluster.config, provider)
        # one QUEUED record per node asked for; it gets a provider id once allocated
        queued = [Instance(NodeState.QUEUED, since=now, node_type=t)
                  for _ in range(launch.count)]
        option = next_option(info, self.backoffs, now)
        while option is not None:
            zone, spot, itype = option.zone, option.spot, option.instance_type
            where = (f"{itype + ' ' if itype else ''}{'spot' if spot else 'on-demand'} in "
                     f"{zone or 'the default zone'}")
            spec, price_tags = pricing.launch(t, option)
            if hold():  # `down` may have begun since this tick's listing
                break
            for rec in queued:  # event: launch requested
                self.instances.set_state(rec, NodeState.REQUESTED)
            try:
                created = provider.create_nodes(spec, launch.count,
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
                    spot=spot, code=e.code, tick=self.ticks())
                for rec in queued:  # back to the queue for the next zone / on-demand
                    self.instances.set_state(rec, NodeState.QUEUED)
                nxt = next_option(info, self.backoffs, now)
                if nxt is None:
                    self.events.record(
                        "launch-failed", f"{launch.count} x {t}: no capacity anywhere it may "
                        "run; retried when the backoff ends", node_type=t, tick=self.ticks())
                elif spot and not nxt.spot:
                    self.events.record(
                        "fallback", f"{t}: no spot capacity in any zone; falling back to "
                        "on-demand", node_type=t, tick=self.ticks())
                option = nxt
                continue
            except LauncherError as e:  # not capacity: back off (no tight loop), say why
                self.backoffs = record_capacity_failure(self.backoffs, t, zone, spot, now,
                                                        instance_type=itype)
                self.events.record("launch-failed", f"{launch.count} x {t} {where}: "
                                   f"{str(e).splitlines()[0]}", node_type=t, tick=self.ticks())
                break
            self.backoffs = clear_backoff(self.backoffs, t, zone, spot, instance_type=itype)
            ids = [n.id for n in created]
            reason = launch.reason
            if info.spot and not spot and "fallback to on-demand" not in reason:
                reason += "; fallback to on-demand: no spot capacity in any zone"
            self.events.record("launch", f"{len(created)} x {t} {where}: {reason}",
                               node_type=t, zone=zone, spot=spot, nodes=ids, tick=self.ticks())
            for n, rec in zip(created, queued):  # event: the provider allocated it
                self.instances.set_state(rec, NodeState.ALLOCATED)
                self.instances[n.id] = rec
                self.start_bootstrap(n, setup=True, why=None)
            for rec in queued[len(created):]:  # the provider made fewer: dropped
                self.instances.set_state(rec, NodeState.TERMINATED)
            return created
        for rec in queued:  # no zone left (backed off), an error, or going down: dropped
            self.instances.set_state(rec, NodeState.TERMINATED)
        return []

    # ------------------------------------------------------------ bootstrapping
    def _bootstrap_node(self, node: Node, setup: bool) -> None:
        from strato.launcher import bootstrap

        bootstrap.bootstrap_node(self.cluster, node, head_address=self.head_address,
                                 setup=setup, restart=True)

    def start_bootstrap(self, node: Node, *, setup: bool, why: str | None) -> None:
        """Set ``node`` up (``setup``) or only restart its runtime, in a thread."""
        if why:
            self.events.record("setup", why, node=node.id, tick=self.ticks())
        rec = self.instances.for_node(node)
        if not setup:  # a runtime restart in place (SSH hosts): a fresh start
            rec.failures, rec.retry_at, rec.missing_since = 0, None, None
        self.instances.move(node.id, NodeState.SETTING_UP)  # event: bootstrap started
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
                self.instances.move(node.id, NodeState.RUNNING)
                self.events.record("ready", f"set up and running after {took:.1f}s",
                                   node=node.id, tick=self.ticks())
                return
            rec.failures += 1  # event: bootstrap failed
            rec.retry_at = self.clock() + setup_retry_delay(rec.failures)
            self.instances.move(node.id, NodeState.SETUP_FAILED)
            first = (str(error).splitlines() or [type(error).__name__])[0]
            self.events.record("setup-failed", f"attempt {rec.failures} failed after "
                               f"{took:.1f}s: {first}", node=node.id, tick=self.ticks())

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

    def close(self) -> None:
        """Let running bootstraps finish in the background; start no more."""
        self._pool.shutdown(wait=False)
