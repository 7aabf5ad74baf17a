"""Autostop end to end on the local provider: the monitor tears the whole cluster down
once no client, task or actor has been active for ``idle_minutes``, and the next
``init(cluster=...)`` brings it back (cold start).

Idle here is 3 s (``idle_minutes: 0.05``) and the monitor ticks every 0.3 s. Processes
are checked gone by pid; the fixture runs ``down`` for whatever is left.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import yaml

import strato
from strato.launcher import commands
from strato.launcher.autoscaler.events import EVENTS_FILE, read_events
from strato.launcher.state import StateDB
from strato.providers.local import LocalProvider
from strato.runtime.session import node_files

pytestmark = pytest.mark.timeout(150)

NAME = "autostop"
IDLE_S = 3.0


@strato.remote
def square(x: int) -> int:
    return x * x


def _config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": NAME,
        "provider": {"type": "local"},
        "autostop": {"idle_minutes": IDLE_S / 60},
        "autoscaler": {"tick_seconds": 0.3},
        "available_node_types": {
            "head": {"resources": {"CPU": 1}},
            "wk": {"resources": {"CPU": 1}, "min_workers": 1, "max_workers": 1},
        },
        "head_node_type": "head",
    }))
    return path


def _nodes() -> list:
    return LocalProvider({}, NAME).list_nodes()


def _pids(home: Path) -> list[int]:
    """The runtime processes of every node and the monitor."""
    provider = LocalProvider({}, NAME)
    pids = [info["pid"] for n in provider.list_nodes()
            for info in node_files(str(provider.local_dir(n.id)))]
    monitor = home / "monitor" / NAME / "monitor.pid"
    if monitor.exists():
        pids.append(int(monitor.read_text()))
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def test_autostop_tears_down_then_init_cold_starts(tmp_path, short_strato_home):
    config = _config(tmp_path / "c.yaml")
    strato.init(cluster=str(config), log_to_driver=False)  # auto-up
    assert strato.get(square.remote(3), timeout=60) == 9
    _wait(lambda: len(_nodes()) == 2 and all(n.is_alive for n in _nodes()), 60,
          "head and min_workers 1")
    pids = _pids(short_strato_home)
    assert len(pids) >= 3  # head, worker, monitor

    # connected (a client session is activity): nothing is stopped, however long
    time.sleep(2 * IDLE_S)
    assert len(_nodes()) == 2 and all(_alive(p) for p in pids)
    auto = commands.status(config)["autostop"]
    assert auto["idle_minutes"] == IDLE_S / 60 and auto["down"] is True
    assert auto["active"] is True and auto["in_seconds"] is None

    strato.shutdown()
    idle_since = time.monotonic()
    _wait(lambda: _nodes() == [], 30, "autostop to remove every node")
    teardown = time.monotonic() - idle_since
    _wait(lambda: not any(_alive(p) for p in pids), 15, "every process to exit")
    events = read_events(short_strato_home / "logs" / NAME / EVENTS_FILE)
    (stop,) = [e for e in events if e["kind"] == "autostop"]
    assert stop["message"].startswith("autostop: idle for ") and \
        stop["message"].endswith(": terminating 2 node(s)")
    record = StateDB(short_strato_home).get(NAME)
    assert record is not None and record.head_address is None  # remembered, head gone
    assert commands.status(config)["nodes"] == []

    # the next init notices the head is gone and brings the cluster back
    t0 = time.monotonic()
    strato.init(cluster=str(config), log_to_driver=False, autostop=False)
    assert strato.get(square.remote(4), timeout=60) == 16
    cold = time.monotonic() - t0
    assert commands.status(config)["autostop"] is None  # init(autostop=False) won
    strato.shutdown()
    time.sleep(2 * IDLE_S)  # idle, but autostop is off now
    assert len([n for n in _nodes() if n.is_alive]) == 2
    print(f"\nFIGURE autostop: idle {IDLE_S:.0f}s -> every node terminated after "
          f"{teardown:.1f}s idle (tick 0.3s); cold start after autostop (init -> first "
          f"task result): {cold:.1f}s")
