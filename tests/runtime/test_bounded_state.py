"""Bounded state: the head forgets old dead nodes, dead actors and finished jobs, and no
longer re-sends every dead node id in each view; agents forget old cancellations, dead
nodes and dead actors. A cluster that lives for weeks stays flat. (The head is driven
directly here, with links that record what it sends.)"""

from __future__ import annotations

import pickle

import pytest

from strato.runtime import head as head_mod
from strato.runtime import messages as m
from strato.runtime.bounded import BoundedSet
from strato.runtime.head import HeadService
from strato.runtime.messages import ActorState
from strato.runtime.spec import ACTOR_CREATE, TaskSpec

pytestmark = pytest.mark.timeout(60)


class Link:
    def __init__(self):
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)


def _nid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _actor_spec(i: int) -> TaskSpec:
    return TaskSpec(task_id=_nid(10**6 + i), kind=ACTOR_CREATE, job_id=b"j" * 4,
                    owner_node=_nid(0), owner_client=b"c" * 4, function_id=b"f" * 8,
                    name=f"A{i}", args=b"", deps=[], return_ids=[],
                    resources={"CPU": 0.0}, actor_id=_nid(10**7 + i), actor_options={})


def test_head_forgets_dead_nodes_actors_and_jobs_past_their_bounds():
    head = HeadService()
    live = Link()
    head.handle(live, (m.REGISTER, _nid(0), "127.0.0.1:1", {"CPU": 1.0}, {}))
    for i in range(1, 400):                      # a spot cluster's churn
        head.handle(Link(), (m.REGISTER, _nid(i), f"127.0.0.1:{i + 1}", {"CPU": 1.0}, {}))
        head.mark_dead(_nid(i), "preempted")
    assert len(head.nodes) == head_mod.DEAD_NODES_KEPT + 1
    assert sum(r.alive for r in head.nodes.values()) == 1

    live.sent.clear()
    head.broadcast_view()
    (view,) = [msg for msg in live.sent if msg[0] == m.VIEW]
    assert view[2] is None                       # dead ids are not re-sent 5x a second
    assert len(pickle.dumps(view)) < 1000
    newcomer = Link()                            # ... but a new node learns them once
    head.handle(newcomer, (m.REGISTER, _nid(999), "127.0.0.1:999", {"CPU": 1.0}, {}))
    first_view = next(msg for msg in newcomer.sent if msg[0] == m.VIEW)
    assert len(first_view[2]) == 399

    zombie = Link()                              # a pruned dead node that wakes up
    head.handle(zombie, (m.HEARTBEAT, _nid(1), {}, None, [], 0, 0))
    assert zombie.sent and zombie.sent[0][0] == m.EXIT

    for i in range(1500):
        job = _nid(5 * 10**6 + i)
        head.handle(live, (m.JOB_STARTED, job, _nid(0)))
        head.handle(live, (m.JOB_FINISHED, job))
    assert len(head.jobs) == head_mod.FINISHED_JOBS_KEPT

    for i in range(1500):
        spec = _actor_spec(i)
        head.handle(live, (m.ACTOR_REGISTER, spec, {}, None))
        head.handle(live, (m.ACTOR_STATE, spec.actor_id, ActorState.ALIVE, _nid(0), None))
        head.handle(live, (m.ACTOR_STATE, spec.actor_id, ActorState.DEAD, _nid(0), None))
    assert len(head.actors) <= head_mod.DEAD_ACTORS_KEPT
    # a call on a handle of a forgotten actor still gets its death, never silence
    asker = Link()
    head.handle(asker, (m.ACTOR_WATCH, _actor_spec(0).actor_id, _nid(0)))
    assert asker.sent[0][0] == m.ACTOR_UPDATE and asker.sent[0][2] == ActorState.DEAD


def test_bounded_set_forgets_the_oldest():
    s = BoundedSet(maxlen=3)
    for x in range(10):
        s.add(x)
    assert len(s) == 3 and list(s) == [7, 8, 9] and 6 not in s and 9 in s
    s.add(7)                                     # re-adding makes it the newest
    s.add(10)
    assert list(s) == [9, 7, 10]


def test_agent_state_is_bounded():
    """Cancellations, dead-node ids, dead actors' locations and deaths, and the direct-call
    results freed before they were known that an agent keeps are bounded."""
    from strato.runtime.agent import actors
    from strato.runtime.agent.direct import DirectCalls
    from strato.runtime.agent.routing import TaskRouter

    class Host(actors.ActorHost, DirectCalls):
        pass
    host = Host.__new__(Host)
    host._init_actors()
    host._init_direct()
    for i in range(3000):
        host.on_actor_update(None, (m.ACTOR_UPDATE, _nid(i), ActorState.DEAD, None, b""))
        host.note_actor_death(_nid(i), i, RuntimeError("died"), False)
    host.on_actor_update(None, (m.ACTOR_UPDATE, _nid(99999), ActorState.ALIVE, _nid(1), None))
    assert len(host.actor_locations) == actors.DEAD_ACTORS_KEPT + 1
    assert len(host._deaths) <= 1000 and host.freed_unknown.maxlen <= 100_000

    router = TaskRouter.__new__(TaskRouter)
    router._init_routing()
    assert isinstance(router.cancelled, BoundedSet) and router.cancelled.maxlen <= 10_000
    for i in range(20_000):
        router.cancelled.add(_nid(i))
        router.dead_nodes().add(_nid(i))
    assert len(router.cancelled) == 10_000 and len(router.dead_nodes()) == 10_000


def test_a_link_to_a_peer_that_stops_reading_is_closed_at_its_bound(monkeypatch):
    """gRPC flow control holds the writer while a peer does not read: the link's queue
    stops at STRATO_MAX_QUEUED_MESSAGES, then the link is closed like a broken one."""
    import asyncio

    from strato.runtime import transport

    monkeypatch.setattr(transport, "MAX_QUEUED", 1000)

    async def scenario():
        stuck = asyncio.Event()

        async def never_written(_frame):
            await stuck.wait()   # the peer never reads: every write waits

        closed = []
        batcher = transport._Batcher(never_written, on_overflow=lambda: closed.append(1))
        for i in range(5000):
            batcher.send((m.OBJ_WANT, _nid(i), _nid(0)))
            if i == 10:
                await asyncio.sleep(0)   # the writer takes a first batch and blocks
        assert closed == [1] and batcher.closed
        assert batcher._queue == []      # what it held is let go, not kept forever
        batcher.send((m.OBJ_WANT, _nid(1), _nid(0)))
        assert batcher._queue == []
    asyncio.run(scenario())


def test_a_local_process_that_stops_reading_is_dropped_not_buffered(tmp_path):
    """A driver that asks for objects and never reads the answers: its agent drops the
    connection once STRATO_MAX_UNREAD_MB is unread, stays small, and serves others."""
    import os
    import socket
    import subprocess
    import sys

    import psutil

    from strato.runtime.control import start_node, stop_nodes
    from strato.runtime.protocol.framing import encode
    from tests.harness.runtime_cluster import _kill_tree, _remove_shm_dirs

    temp_dir = str(tmp_path / "node")
    node = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=temp_dir, num_cpus=1,
                      env={"STRATO_MAX_UNREAD_MB": "8"})
    pid = node.info["pid"]
    try:
        rss_before = psutil.Process(pid).memory_info().rss
        s = socket.socket(socket.AF_UNIX)
        s.connect(node.info["socket"])
        client_id = os.urandom(8)
        node_id = bytes.fromhex(node.info["node_id"])
        oids = [os.urandom(16) for _ in range(200)]      # 200 x 100 KB, distinct values
        s.sendall(encode([(m.HELLO, "driver", client_id, None, None)]
                         + [(m.PUT, oid, os.urandom(100 * 1024), 100 * 1024)
                            for oid in oids]))
        want = encode([(m.WANT, [(oid, node_id) for oid in oids])])   # 20 MB of answers
        dropped = False
        s.settimeout(10)
        try:
            for _ in range(50):                           # up to 1 GB asked, never read
                s.sendall(want)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
        if not dropped:   # our writes went through: the agent must have closed its side
            try:
                while s.recv(1 << 20):
                    pass
                dropped = True
            except ConnectionResetError:
                dropped = True
        s.close()
        assert dropped
        assert psutil.Process(pid).memory_info().rss < rss_before + 200 * 1024 * 1024
        # the node is fine: an ordinary driver runs a task on it
        code = ("import strato, sys\n"
                f"strato.init(address='auto', temp_dir={temp_dir!r})\n"
                "f = strato.remote(lambda x: x + 1)\n"
                "sys.exit(0 if strato.get(f.remote(1), timeout=30) == 2 else 1)\n")
        assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    finally:
        stop_nodes(temp_dir, timeout=10)
        _kill_tree(pid)
        _remove_shm_dirs([pid])


def test_exported_functions_are_forgotten_when_nothing_needs_them(tmp_path):
    """Agents prune their function cache: a node forgets functions its tasks no longer
    need (and tells its workers); the owner sends one again when a later task needs it
    (the peer rejects the task without it once); the head forgets a driver's functions
    after the driver left."""
    import glob

    import strato
    from strato.runtime.control import start_node, stop_nodes
    from tests.harness.runtime_cluster import _kill_tree, _remove_shm_dirs, wait_until

    if strato.is_initialized():
        strato.shutdown()
    env = {"STRATO_FN_SWEEP_S": "0.3"}
    dirs = {n: str(tmp_path / n) for n in "AB"}
    nodes = {}
    try:
        nodes["A"] = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=dirs["A"],
                                num_cpus=1, env=env)
        nodes["B"] = start_node(head=False, join_bundle=nodes["A"].join_bundle,
                                temp_dir=dirs["B"], num_cpus=1, node_ip="127.0.0.1",
                                resources='{"node_b": 1}', env=env)
        strato.init(address="auto", temp_dir=dirs["A"])

        def forgot(name: str) -> int:
            text = "".join(open(p).read() for p in glob.glob(f"{dirs[name]}/logs/node-*.log"))
            return sum(int(line.split("forgot ")[1].split()[0])
                       for line in text.splitlines() if "forgot " in line)

        def make(i):
            @strato.remote(resources={"node_b": 0.1})
            def times_ten():
                return i * 10
            return times_ten
        fns = [make(i) for i in range(5)]             # five distinct closures
        assert strato.get([f.remote() for f in fns], timeout=60) == [0, 10, 20, 30, 40]
        wait_until(lambda: forgot("B") >= 5, 30, 0.1, "B to forget the five functions")
        assert forgot("A") == 0      # the driver that exported them is still here
        # B no longer has them; A thinks it does: B asks, A sends them with the tasks
        assert strato.get([f.remote() for f in fns], timeout=60) == [0, 10, 20, 30, 40]
        strato.shutdown()            # the driver leaves: the head forgets its functions
        wait_until(lambda: forgot("A") >= 5, 30, 0.1, "A to forget the driver's functions")
    finally:
        if strato.is_initialized():
            strato.shutdown()
        for name in ("B", "A"):
            stop_nodes(dirs[name], timeout=10)
        pids = [n.info["pid"] for n in nodes.values()]
        for pid in pids:
            _kill_tree(pid)
        _remove_shm_dirs(pids)
