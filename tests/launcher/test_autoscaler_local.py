"""The autoscaler end to end on the local provider: nodes are runtime processes here.

`strato up` starts only the head and the autoscaler (monitor ``local``); a driver in this
process asks for a custom resource only the worker type has, so every worker comes from
the autoscaler. Processes are stopped by pid (the fixture runs `down`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

import strato
from strato.launcher import commands, reconcile
from strato.launcher.autoscaler.events import EVENTS_FILE, read_events
from strato.launcher.state import StateDB
from strato.providers.local import LocalProvider
from strato.runtime.session import node_files

pytestmark = pytest.mark.timeout(150)

NAME = "auto"
TICK = 0.3


def _config(path: Path, max_workers: int = 1) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster_name": NAME,
        "provider": {"type": "local"},
        "idle_timeout_minutes": 0.05,  # 3 s
        "autoscaler": {"tick_seconds": TICK},
        "available_node_types": {
            "head": {"resources": {"CPU": 1}},
            "wk": {"resources": {"CPU": 2, "w": 2}, "min_workers": 0,
                   "max_workers": max_workers},
        },
        "head_node_type": "head",
    }))
    return path


def _workers() -> list:
    return LocalProvider({}, NAME).list_nodes({"strato-node-kind": "worker"})


def _wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def _events(home: Path) -> list[dict]:
    return read_events(home / "logs" / NAME / EVENTS_FILE)


def _kill_node(node_id: str) -> list[int]:
    """SIGKILL a local node's process and its workers, by pid."""
    temp_dir = str(LocalProvider({}, NAME).local_dir(node_id))
    procs = []
    for info in node_files(temp_dir):
        proc = psutil.Process(info["pid"])
        procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    return [p.pid for p in procs]


@strato.remote(resources={"w": 1}, max_retries=3)
def where(seconds: float) -> tuple[str, float]:
    """The provider node id this ran on (from the node's labels) and when it started."""
    started = time.time()
    me = strato.get_runtime_context().get_node_id()
    labels = {n["NodeID"]: n["Labels"] for n in strato.nodes()}
    time.sleep(seconds)
    return labels[me].get("strato-node-id"), started


def test_scale_up_idle_down_and_replace_dead_worker(tmp_path, short_strato_home):
    config = _config(tmp_path / "auto.yaml")
    result = reconcile.up(config, yes=True)
    assert len(result.created) == 1 and _workers() == []  # only the head: min_workers 0
    head = LocalProvider({}, NAME).list_nodes({"strato-node-kind": "head"})[0]
    strato.init(address="auto", temp_dir=str(LocalProvider({}, NAME).local_dir(head.id)),
                log_to_driver=False)

    # demand for {w: 1} -> the autoscaler launches a worker; the tasks run there
    t0 = time.monotonic()
    ran = strato.get([where.remote(0.2) for _ in range(4)], timeout=60)
    scale_up = time.monotonic() - t0
    (worker,) = _workers()
    assert {node for node, _ in ran} == {worker.id}
    launches = [e for e in _events(short_strato_home) if e["kind"] == "launch"]
    assert len(launches) == 1 and "demand: " in launches[0]["message"]
    assert "w: 1}" in launches[0]["message"]

    # idle past idle_timeout_minutes (3 s) -> terminated, with the reason logged
    idle_removal = _wait(lambda: _workers() == [], 30, "the idle worker to be removed")
    terms = [e for e in _events(short_strato_home) if e["kind"] == "terminate"]
    assert terms and terms[-1]["node"] == worker.id and "idle" in terms[-1]["message"]

    # new demand -> a new worker; kill it mid-task -> replaced, its tasks retried there
    refs = [where.remote(3.0) for _ in range(2)]
    _wait(lambda: len(_workers()) == 1 and _workers()[0].state.value == "running", 30,
          "a worker for the second batch")
    (victim,) = _workers()
    time.sleep(1.5)  # let the tasks start on it
    _kill_node(victim.id)
    died = time.time()
    results = strato.get(refs, timeout=90)
    nodes = {node for node, _ in results}
    assert victim.id not in nodes and len(nodes) == 1
    (replacement,) = nodes
    accepting = min(started for _, started in results) - died
    print(f"\nFIGURE scale-up (demand -> tasks done): {scale_up:.1f}s; idle worker removed "
          f"{idle_removal:.1f}s after its tasks; worker death -> replacement accepting "
          f"tasks: {accepting:.1f}s (tick {TICK}s)")
    kinds = [e["kind"] for e in _events(short_strato_home)]
    assert "terminate" in kinds[kinds.index("launch"):] and kinds.count("launch") >= 3
    dead = [e for e in _events(short_strato_home) if e["kind"] == "terminate"
            and e["node"] == victim.id]
    assert dead and "died" in dead[0]["message"]

    # status shows the autoscaler's decisions among its recent events
    info = commands.status(config)
    assert any(e["message"].startswith("autoscaler launch") for e in info["events"])
    assert info["autoscaler"]["launch_problems"] == []
    strato.shutdown()


RECOVERING_JOB = textwrap.dedent("""
    import json, os, sys, time
    import strato

    strato.init(address="auto")
    if os.environ.get("STRATO_RESUME") == "1":
        with open(sys.argv[1], "w") as f:
            json.dump({"resumed": True}, f)
        sys.exit(0)

    @strato.remote(resources={"w": 1}, max_retries=0)
    def lose_my_node():
        os.kill(os.getppid(), 9)  # the node process: as if its machine was reclaimed
        time.sleep(30)

    strato.get(lose_my_node.remote(), timeout=60)
""")


def test_submit_spot_recovery_relaunches_with_resume(tmp_path, short_strato_home):
    config = _config(tmp_path / "auto.yaml")
    reconcile.up(config, yes=True)
    script = tmp_path / "job.py"
    script.write_text(RECOVERING_JOB)
    out = tmp_path / "out.json"
    assert commands.submit(config, script, [str(out)], spot_recovery=0) != 0
    assert not out.exists()  # no recovery asked for: the failure stands
    assert commands.submit(config, script, [str(out)], spot_recovery=2) == 0
    assert json.loads(out.read_text()) == {"resumed": True}
    assert any("relaunching with STRATO_RESUME=1" in e["message"]
               for e in StateDB().events(NAME))
    # a plain failure (no node lost) is not relaunched
    script.write_text("import sys; sys.exit(3)\n")
    assert commands.submit(config, script, [], spot_recovery=2) == 3
    assert os.environ.get("STRATO_RESUME") is None
