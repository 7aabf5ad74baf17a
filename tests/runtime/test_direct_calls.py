"""Direct actor calls: once an actor on the caller's node is ready, calls go straight to
its worker process (``runtime.direct``), and Ray's semantics hold as they do through the
agent: a handle's calls run in order across the switch, results that escape (passed to a
task, put inside a value) are readable by others, results in the store are freed, a
process that dies mid-call has the call re-run on its restart (or fails it), kill and
cancel work, and garbage on the actor's socket harms nothing.
"""

from __future__ import annotations

import gc
import os
import socket
import stat
import struct
import time

import numpy as np
import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024


def _core():
    from strato.runtime.core import current

    return current()


def _channel(actor):
    from strato.runtime.direct import DirectChannel

    chan = _core().direct.get(actor._actor_id)
    return chan if type(chan) is DirectChannel and not chan.lost else None


def _go_direct(strato, actor) -> object:
    """Call ``actor.ping`` until this driver's channel to it is up (bounded)."""
    def up():
        strato.get(actor.ping.remote(), timeout=30)
        return _channel(actor)
    return wait_until(up, 15, 0.05, "a direct channel to the actor")


def _tables_empty(strato) -> None:
    """The driver's agent owns nothing and the local store holds no object."""
    shm = _core().store_paths[0]

    def empty():
        gc.collect()
        files = [f for f in os.listdir(shm) if not f.startswith("pool-")]
        return not files and _core().rpc("debug_state")["objects"] == 0
    wait_until(empty, 20, 0.1, "the driver's objects to be freed")


def _wait_file(path: str) -> None:
    wait_until(lambda: os.path.exists(path), 30, 0.01, path)


@pytest.fixture
def local(strato_local):
    _tables_empty(strato_local)
    return strato_local


def _counter(strato):
    @strato.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n

        def ping(self):
            return None

        def block(self, started: str, release: str):
            open(started, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.005)
            return "released"

        def big(self, v: int, delay: float = 0.0):
            time.sleep(delay)
            return np.full(MB // 8, v, dtype=np.int64)

    return Counter


def test_calls_keep_their_order_across_the_switch_and_skip_the_agent(local, tmp_path):
    strato = local
    c = _counter(strato).remote()
    refs = [c.add.remote() for _ in range(200)]    # before the actor is up: the agent
    for i in range(400):                           # then direct, once nothing is in flight
        if i % 4 == 0:
            refs.append(c.add.remote())
            strato.get(refs[-1], timeout=30)
        else:
            refs.append(c.add.remote())
    assert strato.get(refs, timeout=60) == list(range(1, 601))
    assert _channel(c) is not None

    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    ref = c.block.remote(started, release)
    _wait_file(started)
    # the call runs, and the agent has no record of it: it went straight to the worker
    assert _core().rpc("debug_state")["owned_tasks"] == 0
    open(release, "w").close()
    assert strato.get(ref, timeout=30) == "released"


def test_results_that_escape_are_readable_by_others_then_freed(local, tmp_path):
    strato = local
    c = _counter(strato).remote()
    _go_direct(strato, c)

    @strato.remote
    def plus_one(x):
        return x + 1

    @strato.remote
    def unbox(box):
        return strato.get(box[0], timeout=30)

    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    slow = c.block.remote(started, release)
    pending = c.add.remote()                 # queued behind the blocked call: not done
    passed = plus_one.remote(pending)        # ... when it is passed on
    boxed = strato.put([c.add.remote()])     # and one nested in a put
    later = unbox.remote(boxed)
    _wait_file(started)
    open(release, "w").close()
    assert strato.get(slow, timeout=30) == "released"
    assert strato.get(passed, timeout=30) == 2
    assert strato.get(later, timeout=30) == 2
    done = c.add.remote()
    assert strato.get(done, timeout=30) == 3
    assert strato.get(plus_one.remote(done), timeout=30) == 4   # finished, then passed on
    del slow, pending, passed, boxed, later, done
    _tables_empty(strato)


def test_results_in_the_store_are_freed_also_when_dropped_in_flight(local):
    strato = local
    c = _counter(strato).remote()
    _go_direct(strato, c)

    @strato.remote
    def total(x):
        return int(x.sum())

    x = strato.get(c.big.remote(3), timeout=30)
    assert x.shape == (MB // 8,) and int(x[0]) == 3
    dropped = c.big.remote(4, 0.3)
    del dropped                              # dropped before its result came
    kept = c.big.remote(5)
    assert strato.get(total.remote(kept), timeout=30) == 5 * (MB // 8)
    assert strato.get(c.add.remote(), timeout=30) == 1   # (after the dropped one ran)
    del x, kept
    _tables_empty(strato)


def test_a_process_that_dies_mid_call_reruns_it_on_its_restart(local, tmp_path):
    strato = local
    marker = str(tmp_path / "crashed-once")

    @strato.remote(max_restarts=1, max_task_retries=1)
    class Fragile:
        def ping(self):
            return None

        def pid(self):
            return os.getpid()

        def crash_once(self, marker):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return os.getpid()

    f = Fragile.remote()
    first = _go_direct(strato, f)
    pid = strato.get(f.pid.remote(), timeout=30)
    assert first.pid == pid
    again = strato.get(f.crash_once.remote(marker), timeout=60)
    assert again != pid
    # the caller finds the new process and calls it directly again
    assert _go_direct(strato, f).pid == again


def test_a_broken_channel_to_a_live_actor_retries_or_fails_the_call(local, tmp_path):
    """The caller's channel breaks while the actor's process lives (here the method cuts
    it): the call in flight is retried through the agent within max_task_retries, on
    the same process, or fails with ActorUnavailableError; it used to wait for an exit
    that never came. The actor keeps its state and takes direct calls again."""
    strato = local

    @strato.remote(max_task_retries=1)
    class Cutter:
        def __init__(self):
            self.runs = 0

        def ping(self):
            return None

        def cut(self, marker):
            import gc
            import socket

            from strato.runtime.direct_host import DirectCaller

            self.runs += 1
            if not os.path.exists(marker):
                open(marker, "w").close()
                for obj in gc.get_objects():
                    if type(obj) is DirectCaller:
                        obj.sock.shutdown(socket.SHUT_RDWR)
            return os.getpid(), self.runs

    a = Cutter.remote()
    chan = _go_direct(strato, a)
    pid, runs = strato.get(a.cut.remote(str(tmp_path / "once")), timeout=60)
    assert pid == chan.pid and runs == 2      # run, cut, re-run on the same process
    assert _go_direct(strato, a).pid == pid

    b = Cutter.options(max_task_retries=0).remote()
    _go_direct(strato, b)
    with pytest.raises(exc.ActorUnavailableError, match="may or may not have run"):
        strato.get(b.cut.remote(str(tmp_path / "twice")), timeout=60)
    assert strato.get(b.cut.remote(str(tmp_path / "twice")), timeout=60)[1] == 2


def test_death_without_restarts_and_kill_fail_calls(local):
    strato = local

    @strato.remote
    class Mortal:
        def ping(self):
            return None

        def die(self):
            os._exit(1)

    m = Mortal.remote()
    path = _go_direct(strato, m).path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(exc.ActorDiedError):
        strato.get(m.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError):
        strato.get(m.ping.remote(), timeout=30)
    wait_until(lambda: not os.path.exists(path), 10, 0.05, "the dead actor's socket to go")

    c = _counter(strato).remote()
    _go_direct(strato, c)
    strato.kill(c)
    with pytest.raises(exc.ActorDiedError):
        strato.get(c.add.remote(), timeout=30)


def test_cancel_a_queued_direct_call(local, tmp_path):
    strato = local
    c = _counter(strato).remote()
    _go_direct(strato, c)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    running = c.block.remote(started, release)
    _wait_file(started)
    queued = c.add.remote()
    strato.cancel(queued)
    open(release, "w").close()
    assert strato.get(running, timeout=30) == "released"
    with pytest.raises(exc.TaskCancelledError):
        strato.get(queued, timeout=30)
    assert strato.get(c.add.remote(), timeout=30) == 1    # the cancelled call never ran


def test_a_task_calls_an_actor_directly(local):
    strato = local
    c = _counter(strato).remote()
    _go_direct(strato, c)

    @strato.remote
    def caller(actor, n):
        from strato.runtime.core import current
        from strato.runtime.direct import DirectChannel

        out = [strato.get(actor.add.remote(), timeout=30) for _ in range(n)]
        deadline = time.monotonic() + 10
        while type(current().direct.get(actor._actor_id)) is not DirectChannel:
            assert time.monotonic() < deadline, "no direct channel from the task"
            out.append(strato.get(actor.add.remote(), timeout=30))
        return out

    out = strato.get(caller.remote(c, 50), timeout=60)
    assert out == list(range(1, len(out) + 1))


def test_garbage_on_the_actors_socket_harms_nothing(local):
    strato = local
    c = _counter(strato).remote()
    path = _go_direct(strato, c).path
    from strato.runtime.protocol.framing import encode

    payloads = [os.urandom(4096), struct.pack("<I", 1000) + b"short", b"\x00" * 64,
                struct.pack("<I", 5) + b"nope!",   # a frame that is no pickle
                # a slim actor call on a channel that sent no call in full, and one
                # whose fields have the wrong types
                encode([("dacall", b"t" * 16, "add", b"", [b"r" * 16], 1)]),
                encode([("dacall", 1, 2, 3, 4, 5)])]
    for payload in payloads:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        s.close()
    assert strato.get([c.add.remote() for _ in range(20)], timeout=30) == list(range(1, 21))


def test_calls_after_the_first_go_slim_and_run_as_sent(local):
    """After one call in full, a channel sends an actor's calls as only what differs
    (task id, method, arguments, return ids, order); the worker fills in the rest from
    that first call: each runs the method sent, in order, named so in errors, as part
    of the caller's job."""
    strato = local

    @strato.remote
    class Named:
        def ping(self):
            return "pong"

        def echo(self, x):
            return x

        def boom(self):
            raise ValueError("boom")

        def job(self):
            return strato.get_runtime_context().get_job_id()

    a = Named.remote()
    chan = _go_direct(strato, a)
    assert chan._template is not None and chan._template.method == "ping"
    assert strato.get([a.echo.remote(i) for i in range(50)], timeout=30) == list(range(50))
    with pytest.raises(ValueError, match="boom") as info:
        strato.get(a.boom.remote(), timeout=30)
    assert "Named.boom" in str(info.value)
    assert strato.get(a.job.remote(), timeout=30) == strato.get_runtime_context().get_job_id()
    assert chan._template.method == "ping"      # (all of them went slim)
    strato.kill(a)


def test_calls_to_a_busy_actor_never_block_the_caller(local, tmp_path):
    """The actor's worker reads its socket only between calls: 20 MB of calls made while
    it is busy wait in the caller's channel, and the caller goes on at once."""
    strato = local

    @strato.remote
    class Echo:
        def ping(self):
            return None

        def block(self, started, release):
            open(started, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.005)
            return "released"

        def size(self, blob):
            return len(blob)

    e = Echo.remote()
    _go_direct(strato, e)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    busy = e.block.remote(started, release)
    _wait_file(started)
    blob = b"x" * 20_000
    refs = [e.size.remote(blob) for _ in range(1000)]   # far more than a socket holds
    ready, _ = strato.wait([busy], timeout=0)
    assert not ready                                     # all made while it was busy
    open(release, "w").close()
    assert strato.get(busy, timeout=30) == "released"
    assert strato.get(refs, timeout=60) == [20_000] * 1000


def test_threads_calling_one_actor_all_get_their_results(local):
    """Several threads wait on one channel at once: whichever reads it hands the others
    their results (nothing lost, nothing waits forever)."""
    import threading

    strato = local
    c = _counter(strato).remote()
    _go_direct(strato, c)
    got: list = []
    errors: list = []

    def calls():
        try:
            for _ in range(200):
                got.append(strato.get(c.add.remote(), timeout=30))
        except BaseException as e:   # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=calls) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(got) == list(range(1, 801))
