"""The head can restart: its tables live in SQLite on its disk (TEMP_DIR/head.db), so a
head process that crashed and starts again at the same address resumes. Nodes
re-register and say which actors they host; named and detached actors are found again
with their state; an actor that lived on the crashed head's node restarts once the
grace period ends."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import pytest

from tests.harness.runtime_cluster import _kill_tree, _remove_shm_dirs, wait_until

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_crashed_head_restarts_and_the_cluster_resumes():
    import strato
    from strato.runtime.control import start_node, stop_nodes

    if strato.is_initialized():
        strato.shutdown()
    root = tempfile.mkdtemp(prefix="strato-hr-")
    dirs = {n: os.path.join(root, n) for n in ("head", "b")}
    env = {"STRATO_HEARTBEAT_TIMEOUT": "2", "STRATO_HEAD_RESUME_GRACE": "4"}
    port = _free_port()
    pids = []
    try:
        head = start_node(head=True, port=port, node_ip="127.0.0.1", temp_dir=dirs["head"],
                          num_cpus=1, resources=json.dumps({"head_res": 1}), env=env)
        pids.append(head.info["pid"])
        b = start_node(head=False, join_bundle=head.join_bundle, temp_dir=dirs["b"],
                       num_cpus=1, node_ip="127.0.0.1", resources=json.dumps({"node_b": 1}),
                       env=env)
        pids.append(b.info["pid"])
        token = head.token
        strato.init(address="auto", temp_dir=dirs["b"])   # the driver lives on B

        @strato.remote
        class Keeper:
            def __init__(self):
                self.n = 0

            def inc(self):
                self.n += 1
                return self.n

            def pid(self):
                return os.getpid()

        keeper = Keeper.options(name="keeper", lifetime="detached",
                                resources={"node_b": 0.1}).remote()
        assert strato.get([keeper.inc.remote() for _ in range(2)], timeout=30) == [1, 2]
        keeper_pid = strato.get(keeper.pid.remote(), timeout=30)
        phoenix = Keeper.options(name="phoenix", lifetime="detached", max_restarts=1,
                                 resources={"head_res": 0.5}).remote()
        assert strato.get(phoenix.inc.remote(), timeout=30) == 1

        _kill_tree(head.info["pid"])                       # the head crashes
        head2 = start_node(head=True, port=port, node_ip="127.0.0.1", temp_dir=dirs["head"],
                           num_cpus=1, resources=json.dumps({"head_res": 1}), env=env)
        pids.append(head2.info["pid"])
        assert head2.address == head.address and head2.token == token

        # B re-registers with the actors it hosts: the detached actor is the same process
        def b_is_back():
            try:
                return any(n["Alive"] and n["NodeID"] == b.info["node_id"]
                           for n in strato.nodes())
            except strato.exceptions.HeadUnreachableError:
                return False   # the head is not back yet: answered at once, not hung
        wait_until(b_is_back, 30, 0.2, "B to re-register")
        again = strato.get_actor("keeper")
        assert strato.get(again.inc.remote(), timeout=30) == 3
        assert strato.get(keeper.inc.remote(), timeout=30) == 4   # the old handle too
        assert strato.get(again.pid.remote(), timeout=30) == keeper_pid
        # the actor that lived on the crashed head's node restarts after the grace period
        back = strato.get_actor("phoenix")
        assert strato.get(back.inc.remote(), timeout=40) == 1
        strato.kill(again)
        strato.kill(back)
    finally:
        if strato.is_initialized():
            strato.shutdown()
        for d in dirs.values():
            stop_nodes(d, timeout=10)
        for pid in pids:
            _kill_tree(pid)
        _remove_shm_dirs(pids)
        shutil.rmtree(root, ignore_errors=True)
    assert not os.path.exists(os.path.join(dirs["head"], "head.db"))  # clean stop: ended


_SPAWN = """
import sys, time
import numpy as np
import strato
strato.init(address="auto", temp_dir=sys.argv[1])

@strato.remote
def double(a):
    return a * 2

@strato.remote
def when_released(a, flag):
    import os, time
    while not os.path.exists(flag):
        time.sleep(0.05)
    return int(a.sum())

arg = np.arange(1_000_000, dtype=np.int64)          # 8 MB: kept in the store, not inline
done = double.spawn(arg)
pending = when_released.spawn(arg, sys.argv[2])
assert int(done.get(timeout=60)[-1]) == 2 * 999_999   # finished before the crash
print(done.id, pending.id, flush=True)
"""

_FETCH = """
import sys
import strato
from strato import FunctionCall
strato.init(address="auto", temp_dir=sys.argv[1])
done = FunctionCall.from_id(sys.argv[2]).get(timeout=60)
open(sys.argv[4], "w").close()                       # let the re-run call finish
pending = FunctionCall.from_id(sys.argv[3]).get(timeout=60)
print(int(done[-1]), int(done.sum()), pending, flush=True)
"""


def test_durable_calls_survive_a_head_restart():
    """A finished durable call keeps its (stored) result and an unfinished one runs
    again after the head process crashes and restarts on the same temp dir."""
    import subprocess
    import sys

    from strato.runtime.control import start_node, stop_nodes

    root = tempfile.mkdtemp(prefix="strato-hrd-")
    head_dir = os.path.join(root, "head")
    flag = os.path.join(root, "release")
    env = {"STRATO_HEARTBEAT_TIMEOUT": "2", "STRATO_HEAD_RESUME_GRACE": "2"}
    port = _free_port()
    pids = []
    try:
        head = start_node(head=True, port=port, node_ip="127.0.0.1", temp_dir=head_dir,
                          num_cpus=2, env=env)
        pids.append(head.info["pid"])
        spawned = subprocess.run([sys.executable, "-c", _SPAWN, head_dir, flag],
                                 capture_output=True, text=True, timeout=90)
        assert spawned.returncode == 0, spawned.stderr
        done_id, pending_id = spawned.stdout.split()

        _kill_tree(head.info["pid"])                       # the head crashes mid-call
        head2 = start_node(head=True, port=port, node_ip="127.0.0.1", temp_dir=head_dir,
                           num_cpus=2, env=env)
        pids.append(head2.info["pid"])
        fetched = subprocess.run([sys.executable, "-c", _FETCH, head_dir, done_id,
                                  pending_id, flag],
                                 capture_output=True, text=True, timeout=90)
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.split() == [str(2 * 999_999), str(999_999 * 1_000_000),
                                          str(999_999 * 1_000_000 // 2)]
    finally:
        stop_nodes(head_dir, timeout=10)
        for pid in pids:
            _kill_tree(pid)
        _remove_shm_dirs(pids)
        shutil.rmtree(root, ignore_errors=True)
