"""``python -m strato.launcher.monitor``: the autoscaler process beside the head.

A thin entry point: it rebuilds the cluster from the spec ``strato up`` wrote and runs
``autoscaler.loop.Autoscaler`` (demand-driven launches, idle scale-down, replacement of
preempted / dead / lost workers, capacity fallback; see that module) every
``autoscaler.tick_seconds``. Decisions are logged to ``autoscaler-events.jsonl`` in the
cluster's log directory and echoed to stdout (``monitor.log``).

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
import os
import signal
import sys
import time
from pathlib import Path

from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.loop import Autoscaler, HeadRuntime
from strato.launcher.cluster import Cluster
from strato.launcher.config import load_config_from_dict


def build(cluster: Cluster, spec: dict) -> Autoscaler:
    """The autoscaler for the cluster ``up`` described in ``spec``, attached to its head."""
    def head_temp_dir() -> str:
        return cluster.temp_dir_path(cluster.require_head())

    events = EventLog(cluster.state.log_dir(cluster.name) / "autoscaler-events.jsonl",
                      echo=lambda line: print(line, flush=True))
    return Autoscaler(cluster, runtime=HeadRuntime(head_temp_dir, cluster.token),
                      events=events, head_address=spec["head_address"],
                      min_workers=dict(spec.get("min_workers") or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strato.launcher.monitor")
    parser.add_argument("--spec", required=True, help="JSON written by `strato up`")
    parser.add_argument("--pid-file", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    config = load_config_from_dict(spec["config"], source=args.spec)
    cluster = Cluster(config, echo=True, overrides=spec)
    cluster.token = os.environ.get("STRATO_TOKEN") or None
    autoscaler = build(cluster, spec)
    signal.signal(signal.SIGTERM, lambda *_: autoscaler.stop.set())
    signal.signal(signal.SIGINT, lambda *_: autoscaler.stop.set())
    pid_file = Path(args.pid_file)
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pid_file)
    print(f"{time.strftime('%H:%M:%S')} monitor of cluster {cluster.name!r} started "
          f"(autoscaler, pid {os.getpid()}, tick {autoscaler.tick_seconds:g}s)", flush=True)
    try:
        autoscaler.run()
    finally:
        autoscaler.close()
        if isinstance(autoscaler.runtime, HeadRuntime):
            autoscaler.runtime.close()
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
