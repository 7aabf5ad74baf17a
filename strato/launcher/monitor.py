"""``python -m strato.launcher.monitor``: the process beside the head that keeps min_workers.

A minimal stand-in for the full autoscaler (``autoscaler/``): every tick it replaces
workers the provider reports dead (crashed local processes, preempted or stopped cloud
machines), creates workers up to ``min_workers`` of each type, and restarts the runtime
on workers whose runtime vanished from the head for more than a grace period. Nodes
tagged ``update-failed`` are left for the next ``strato up``.

Where it runs (``provider.monitor`` or env ``STRATO_MONITOR``):

- ``local`` (default for the local provider): on this machine, same ``$STRATO_HOME``.
- ``head`` (default otherwise): on the head, started by ``up`` with a spec file, the SSH
  key and ``STRATO_TOKEN`` in its environment. For ``ssh`` it works on a copy of the
  host claims and only restarts runtimes (it never claims hosts the launcher does not
  know). For ``aws``/``gcp`` the head needs cloud credentials of its own (an instance
  profile allowed to run/describe/terminate/tag instances; a service account with
  compute.instances.* on GCP); tests against moto or the GCE fake use ``local`` or ``off``.
- ``off``: no monitor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from strato.exceptions import CapacityError
from strato.launcher import bootstrap
from strato.launcher.cluster import TAG_NODE_ID_LABEL, Cluster
from strato.launcher.config import load_config_from_dict
from strato.providers.base import TAG_STATUS, NodeKind, NodeStatus

log = logging.getLogger("strato.monitor")
WORKER = NodeKind.WORKER.value


class Monitor:
    """One cluster's min_workers keeper; ``tick()`` is one pass, ``run()`` loops."""

    def __init__(self, cluster: Cluster, head_address: str, min_workers: dict[str, int],
                 *, tick_seconds: float, grace_seconds: float | None = None):
        self.cluster = cluster
        self.head_address = head_address
        self.min_workers = min_workers
        self.tick_seconds = tick_seconds
        self.grace_seconds = grace_seconds if grace_seconds is not None else \
            max(5.0, 3 * tick_seconds)
        self.missing_since: dict[str, float] = {}
        # ssh hosts are fixed: the monitor's copy of the claims must not diverge
        self.can_create = cluster.kind != "ssh"
        self.stop = threading.Event()

    def tick(self) -> list[str]:
        """One pass; returns what was done, one line per action."""
        cluster, provider = self.cluster, self.cluster.provider
        actions: list[str] = []
        head = cluster.head()
        if head is None:
            return actions
        info = cluster.runtime_info(head)
        alive_ids = None if info is None else {
            n.get("Labels", {}).get(TAG_NODE_ID_LABEL) for n in info.get("nodes", [])
            if n.get("Alive")}
        workers = cluster.nodes(kind=WORKER, alive_only=False)
        jobs = []
        now = time.monotonic()
        for node_type, want in self.min_workers.items():
            mine = [n for n in workers if n.node_type == node_type]
            dead = [n for n in mine if not n.is_alive]
            if dead and self.can_create:
                provider.terminate_nodes([n.id for n in dead])
                actions += [f"terminated dead {node_type} worker {n.id} ({n.state.value})"
                            for n in dead]
            alive = [n for n in mine if n.is_alive]
            missing = want - len(alive)
            if missing > 0 and self.can_create:
                try:
                    created = provider.create_nodes(
                        cluster.config.node_type_spec(node_type), missing,
                        _tags(cluster, node_type))
                except CapacityError as e:
                    actions.append(f"no capacity for {node_type}: {e}")
                    created = []
                actions += [f"created {node_type} worker {n.id} (min_workers)" for n in created]
                jobs += [(n, True) for n in created]
            for n in alive:
                if alive_ids is None or n.tags.get(TAG_STATUS) != NodeStatus.UP_TO_DATE.value:
                    continue
                if n.id in alive_ids:
                    self.missing_since.pop(n.id, None)
                    continue
                since = self.missing_since.setdefault(n.id, now)
                if now - since >= self.grace_seconds:
                    self.missing_since.pop(n.id, None)
                    actions.append(f"restarting the runtime of {n.id} (gone from the head)")
                    jobs.append((n, False))
        for node, setup in jobs:
            try:
                bootstrap.bootstrap_node(cluster, node, head_address=self.head_address,
                                         setup=setup, restart=True)
            except Exception as e:
                actions.append(f"bootstrap of {node.id} failed: {str(e).splitlines()[0]}")
        for line in actions:
            cluster.state.add_event(cluster.name, f"monitor: {line}")
        return actions

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in self.tick():
                    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
            except Exception:
                traceback.print_exc()
                sys.stdout.flush()
            self.stop.wait(self.tick_seconds)


def _tags(cluster: Cluster, node_type: str) -> dict[str, str]:
    from strato.launcher.commands import _new_tags

    return _new_tags(cluster, WORKER, node_type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strato.launcher.monitor")
    parser.add_argument("--spec", required=True, help="JSON written by `strato up`")
    parser.add_argument("--pid-file", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    config = load_config_from_dict(spec["config"], source=args.spec)
    cluster = Cluster(config, echo=True, overrides=spec)
    cluster.token = os.environ.get("STRATO_TOKEN") or None
    monitor = Monitor(cluster, spec["head_address"], dict(spec["min_workers"]),
                      tick_seconds=config.autoscaler.tick_seconds)
    signal.signal(signal.SIGTERM, lambda *_: monitor.stop.set())
    signal.signal(signal.SIGINT, lambda *_: monitor.stop.set())
    pid_file = Path(args.pid_file)
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pid_file)
    print(f"{time.strftime('%H:%M:%S')} monitor of cluster {cluster.name!r} started "
          f"(pid {os.getpid()}, tick {monitor.tick_seconds:g}s)", flush=True)
    try:
        monitor.run()
    finally:
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
