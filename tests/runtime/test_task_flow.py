"""Tasks that only another node can run keep flowing to it between the head's views.

A node places the tasks it owns from the head's periodic view of the others. It used to
count a task it sent as taking room there until the next view, so a stream of tasks for
a busy node went one per view (0.2 s by default). Here the head sends its view once an
hour: every task still runs, each sent as the one before it ends, and an actor waiting
for room is still placed as soon as there is some.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from tests.harness.runtime_cluster import _kill_tree, _remove_shm_dirs, wait_until


@pytest.mark.timeout(90)
def test_tasks_for_a_busy_node_go_as_it_frees_up(monkeypatch, tmp_path):
    import strato
    from strato.runtime.agent.routing import QUEUED_PER_NODE
    from strato.runtime.control import start_node, stop_nodes
    from strato.runtime.core import current

    if strato.is_initialized():
        strato.shutdown()
    monkeypatch.setenv("STRATO_VIEW_INTERVAL_S", "3600")
    dirs = {n: tempfile.mkdtemp(prefix=f"strato-flow{n}-") for n in "AB"}
    nodes: dict = {}
    try:
        nodes["A"] = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=dirs["A"],
                                num_cpus=1)
        nodes["B"] = start_node(head=False, address=nodes["A"].address,
                                join_bundle=nodes["A"].join_bundle, temp_dir=dirs["B"],
                                num_cpus=1, node_ip="127.0.0.1", resources='{"node_b": 1}')
        strato.init(address="auto", temp_dir=dirs["A"])
        wait_until(lambda: sum(n["Alive"] for n in strato.nodes()) == 2, 20, 0.05,
                   "2 live nodes")

        @strato.remote(resources={"node_b": 1})    # all of B: one at a time
        def where(i):
            return i, strato.get_runtime_context().get_node_id()

        b = nodes["B"].info["node_id"]
        for _ in range(2):   # (the second time B's worker is up: no start-up in between)
            got = strato.get([where.remote(i) for i in range(30)], timeout=45)
            assert got == [(i, b) for i in range(30)]

        # while B is busy, two more wait there and the rest here (a bounded queue)
        @strato.remote(resources={"node_b": 1})
        def hold(started, release):
            open(started, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.005)
            return "held"

        started, release = str(tmp_path / "started"), str(tmp_path / "release")
        held = hold.remote(started, release)
        wait_until(lambda: os.path.exists(started), 30, 0.01, "the holding task to start")
        refs = [where.remote(i) for i in range(10)]
        # (the holding task may itself have gone to B as one that waits: then one more
        # waits here)
        wait_until(lambda: 10 - QUEUED_PER_NODE <= current().rpc("debug_state")["waiting"] < 10,
                   10, 0.02, f"at most {QUEUED_PER_NODE} tasks queued at B, the rest at A")
        open(release, "w").close()
        assert strato.get(held, timeout=30) == "held"
        assert strato.get(refs, timeout=30) == [(i, b) for i in range(10)]

        # the head still places a pending actor as soon as room frees up: only its view
        # waits for the hour, not its placement of actors
        @strato.remote(resources={"node_b": 1})
        class Holder:
            def node(self):
                return strato.get_runtime_context().get_node_id()

        first = Holder.remote()
        assert strato.get(first.node.remote(), timeout=30) == b
        second = Holder.remote()                  # pending: B is taken
        strato.kill(first)
        assert strato.get(second.node.remote(), timeout=30) == b
    finally:
        if strato.is_initialized():
            strato.shutdown()
        pids = [n.info["pid"] for n in nodes.values()]
        for name in ("B", "A"):
            try:
                stop_nodes(dirs[name])
            except Exception:
                pass
        for pid in pids:
            _kill_tree(pid)
        _remove_shm_dirs(pids)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
