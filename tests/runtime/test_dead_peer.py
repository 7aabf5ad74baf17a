"""Nothing hangs on a dead peer: a pull from a node that stops answering fails once the
node is dead and the object is rebuilt by lineage; the stalled node, when it wakes up
after the head gave up on it, is told to exit instead of living on as a zombie."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest

from tests.harness.runtime_cluster import wait_until
from tests.runtime.test_multinode import _occupy_a_and_b, write

pytestmark = pytest.mark.timeout(120)


def test_pull_from_a_stalled_node_fails_over_to_lineage_and_the_zombie_exits(
        multinode_fn, tmp_path):
    import strato

    cluster = multinode_fn
    gate = str(tmp_path / "gate")
    holders = _occupy_a_and_b(strato, cluster, gate, tmp_path)

    @strato.remote(num_cpus=1, max_retries=2)
    def produce(marker_dir):
        node = strato.get_runtime_context().get_node_id()
        with open(os.path.join(marker_dir, "runs"), "a") as f:
            f.write(node + "\n")
        return np.full(4_000_000, 3, dtype=np.int64)  # 32 MB: several chunks from C's store

    ref = produce.remote(str(tmp_path))
    ready, _ = strato.wait([ref], num_returns=1, timeout=30, fetch_local=False)
    assert ready == [ref]
    with open(tmp_path / "runs") as f:
        assert f.read().split() == [cluster.node_id("C")]
    write(gate, "open")
    assert strato.get(holders, timeout=30) == ["held", "held"]

    pid = cluster.pid("C")
    os.kill(pid, signal.SIGSTOP)   # a GC pause / a stuck disk: C answers nothing
    try:
        # the pull starts while C still counts as alive, then C is declared dead
        value = strato.get(ref, timeout=40)
        assert value.shape == (4_000_000,) and int(value[0]) == 3 and int(value[-1]) == 3
        with open(tmp_path / "runs") as f:
            runs = f.read().split()
        assert len(runs) == 2 and runs[1] in (cluster.node_id("A"), cluster.node_id("B"))
        assert not any(n["Alive"] for n in strato.nodes()
                       if n["NodeID"] == cluster.node_id("C"))
    finally:
        os.kill(pid, signal.SIGCONT)
    # C wakes up, heartbeats to a head that declared it dead: it is told to exit
    wait_until(lambda: not psutil.pid_exists(pid)
               or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 20, 0.1,
               "the stalled node to exit once it woke up")
    assert sum(n["Alive"] for n in strato.nodes()) == 2


def test_a_stalled_head_declares_nobody_dead_and_never_exits_its_own_node():
    """The head's own loop stalled (its heartbeats waited unread): it gives every node a
    fresh grace instead of declaring them all dead, its own in-process node included
    (which it would then have told to exit, taking the head down with it)."""
    import time

    from strato.runtime import messages as m
    from strato.runtime.head import HeadService

    class Link:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(msg)

    head = HeadService(heartbeat_timeout=2.0)
    own, other = Link(), Link()
    head.local_node = b"A" * 16
    head.handle(own, (m.REGISTER, b"A" * 16, "127.0.0.1:1", {"CPU": 1.0}, {}))
    head.handle(other, (m.REGISTER, b"B" * 16, "127.0.0.1:2", {"CPU": 1.0}, {}))
    for rec in head.nodes.values():
        rec.last_heartbeat -= 10          # nothing read for 10 s ...
    head._last_tick -= 10                 # ... because the head itself was stalled
    head._tick()
    assert all(rec.alive for rec in head.nodes.values())
    head.nodes[b"B" * 16].last_heartbeat -= 10   # later, B alone goes silent: dead
    head._tick()
    assert not head.nodes[b"B" * 16].alive and head.nodes[b"A" * 16].alive
    head.mark_dead(b"A" * 16, "test")
    own.sent.clear()
    head.handle(own, (m.HEARTBEAT, b"A" * 16, {}, None, [], 0, 0))
    assert not any(msg[0] == m.EXIT for msg in own.sent)
    other.sent.clear()
    head.handle(other, (m.HEARTBEAT, b"B" * 16, {}, None, [], 0, 0))
    assert other.sent[0][0] == m.EXIT
    assert time.time() - head._last_tick < 5
