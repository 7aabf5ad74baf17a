"""Leased workers: a caller whose tasks of one shape finish on its node gets a worker
lent for that shape and sends its next tasks straight to it (``runtime.leases``). The
lease goes back when unused or when other tasks wait for its room; a leased worker that
dies has its task retried or failed as the agent would; cancel (also force), results in
the store, results passed on and tasks that block in ``get`` behave as without leases.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
CPU1 = (("CPU", 1.0),)


def _core():
    from strato.runtime.core import current

    return current()


def _state():
    return _core().rpc("debug_state")


def _leased(strato, fn) -> object:
    """Call ``fn`` until this driver holds a lease for its shape; returns the lease."""
    def held():
        strato.get(fn.remote(), timeout=30)
        lease = _core().leases.get(CPU1)
        return lease if lease is not None and lease.chan is not None else None
    return wait_until(held, 15, 0.0, "a leased worker")


def _wait_file(path: str) -> None:
    wait_until(lambda: os.path.exists(path), 30, 0.01, path)


@pytest.fixture
def local(strato_local):
    wait_until(lambda: not _core().leases, 10, 0.05, "no lease held before the test")
    return strato_local


def test_a_sync_loop_runs_on_a_leased_worker_which_goes_back_when_unused(local, tmp_path):
    strato = local

    @strato.remote
    def pid():
        return os.getpid()

    @strato.remote
    def block(started, release):
        open(started, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.005)
        return os.getpid()

    lease = _leased(strato, pid)
    assert os.path.exists(lease.path)
    pids = {strato.get(pid.remote(), timeout=30) for _ in range(50)}
    assert pids == {lease.pid}                   # every call ran on the leased worker
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    ref = block.remote(started, release)
    _wait_file(started)
    state = _state()
    assert state["owned_tasks"] == 0             # the agent does not route it
    assert state["available"]["CPU"] == 1.0      # the lease holds the other CPU
    open(release, "w").close()
    assert strato.get(ref, timeout=30) == lease.pid
    # unused, it goes back: the agent has both CPUs free again
    wait_until(lambda: not _core().leases and _state()["available"]["CPU"] == 2.0, 10,
               0.02, "the lease to go back")


def test_other_tasks_waiting_for_its_room_revoke_a_lease(local):
    strato = local

    @strato.remote
    def small():
        return 1

    @strato.remote(num_cpus=2)
    def wide():
        return "ran"

    _leased(strato, small)
    stop = threading.Event()
    calls = []

    def loop():                        # keeps the lease busy, never idle for long
        while not stop.is_set() and len(calls) < 100_000:
            calls.append(strato.get(small.remote(), timeout=30))
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        wait_until(lambda: len(calls) > 20, 10, 0.01, "the loop to run")
        # needs both CPUs: waits, and the agent asks for the lease back
        assert strato.get(wide.remote(), timeout=20) == "ran"
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and len(calls) > 20


def test_a_leased_worker_that_dies_has_its_task_retried_or_failed(local, tmp_path):
    strato = local

    @strato.remote
    def pid():
        return os.getpid()

    @strato.remote(max_retries=1)
    def die_once(marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getpid()

    @strato.remote(max_retries=0)
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    lease = _leased(strato, pid)
    again = strato.get(die_once.remote(str(tmp_path / "m")), timeout=60)
    assert again != lease.pid                    # re-run on another worker
    wait_until(lambda: not os.path.exists(lease.path), 10, 0.05, "the dead worker's socket")
    _leased(strato, pid)
    with pytest.raises(exc.WorkerCrashedError):
        strato.get(die.remote(), timeout=60)


def test_a_broken_channel_to_a_live_leased_worker_ends_it_and_retries(local, tmp_path):
    """The caller's connection to a leased worker breaks while the worker lives (here
    the task cuts it; in life: a pid reused by another worker, a protocol error): the
    agent ends that worker, which nobody else may use, and its exit retries the task.
    The agent used to wait for an exit that never came, and the get hung."""
    strato = local

    @strato.remote
    def pid():
        return os.getpid()

    @strato.remote(max_retries=1)
    def cut_once(marker):
        import gc
        import socket

        from strato.runtime.direct_host import DirectCaller

        if not os.path.exists(marker):
            open(marker, "w").close()
            for obj in gc.get_objects():
                if type(obj) is DirectCaller:
                    obj.sock.shutdown(socket.SHUT_RDWR)
        return os.getpid()

    lease = _leased(strato, pid)
    marker = str(tmp_path / "cut")
    again = strato.get(cut_once.remote(marker), timeout=60)
    assert os.path.exists(marker)                # the first run cut its channel
    assert again != lease.pid                    # re-run on another worker
    wait_until(lambda: not os.path.exists(lease.path), 10, 0.05, "the cut worker's end")
    assert strato.get(pid.remote(), timeout=30) > 0


def test_cancel_a_task_on_a_leased_worker(local, tmp_path):
    strato = local

    @strato.remote
    def pid():
        return os.getpid()

    @strato.remote
    def sleeper(started):
        open(started, "w").close()
        time.sleep(60)
        return "not cancelled"

    lease = _leased(strato, pid)
    started = str(tmp_path / "started")
    ref = sleeper.remote(started)
    _wait_file(started)
    assert ref.id in lease.chan.inflight         # it runs on the leased worker
    strato.cancel(ref)
    with pytest.raises(exc.TaskCancelledError):
        strato.get(ref, timeout=30)
    assert strato.get(pid.remote(), timeout=30) > 0


def test_store_results_nested_gets_and_results_passed_on(local):
    strato = local

    @strato.remote
    def big(v):
        return np.full(MB // 8, v, dtype=np.int64)

    @strato.remote
    def total(x):
        return int(x.sum())

    @strato.remote
    def inner(x):
        return x * 2

    @strato.remote
    def outer(x):                # blocks in get on a task of the same shape
        return strato.get(inner.remote(x), timeout=30) + 1

    @strato.remote
    def pid():
        return os.getpid()

    _leased(strato, pid)
    assert [strato.get(outer.remote(i), timeout=30) for i in range(30)] == \
        [2 * i + 1 for i in range(30)]
    kept = big.remote(3)
    assert strato.get(total.remote(kept), timeout=30) == 3 * (MB // 8)
    x = strato.get(big.remote(4), timeout=30)
    assert int(x[0]) == 4
    dropped = big.remote(5)
    del dropped, kept, x
    shm = _core().store_paths[0]

    def empty():
        gc.collect()
        return not [f for f in os.listdir(shm) if not f.startswith("pool-")] \
            and _state()["objects"] == 0
    wait_until(empty, 20, 0.1, "the results to be freed")
