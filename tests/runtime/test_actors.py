"""Actors on the embedded cluster: state, order, errors, concurrency, names, detached
actors, kill and restarts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until
from tests.runtime.api_helpers import MyError

pytestmark = pytest.mark.timeout(60)


def test_actor_state(strato_local):
    strato = strato_local

    @strato.remote
    class Counter:
        def __init__(self, start=0):
            self.n = start

        def inc(self, by=1):
            self.n += by
            return self.n

    c = Counter.remote(10)
    assert strato.get(c.inc.remote()) == 11
    assert strato.get(c.inc.remote(by=5)) == 16
    other = Counter.remote()
    assert strato.get(other.inc.remote()) == 1
    assert strato.get(c.inc.remote()) == 17


def test_actor_per_caller_order(strato_local):
    strato = strato_local

    @strato.remote
    class Log:
        def __init__(self):
            self.seen = []

        def add(self, i):
            self.seen.append(i)
            return i

        def all(self):
            return self.seen

    log = Log.remote()
    refs = [log.add.remote(i) for i in range(1000)]
    assert strato.get(refs) == list(range(1000))
    assert strato.get(log.all.remote()) == list(range(1000))


def test_actor_method_num_returns(strato_local):
    strato = strato_local

    @strato.remote
    class Splitter:
        @strato.method(num_returns=2)
        def split(self, s):
            a, b = s.split(",")
            return a, b

    s = Splitter.remote()
    a, b = s.split.remote("left,right")
    assert strato.get([a, b]) == ["left", "right"]


def test_actor_errors_keep_actor_alive(strato_local):
    strato = strato_local

    @strato.remote
    class Fragile:
        def boom(self):
            raise MyError("actor method failed")

        def ok(self):
            return "still alive"

    f = Fragile.remote()
    with pytest.raises(MyError) as info:
        strato.get(f.boom.remote())
    assert isinstance(info.value, exc.TaskError)
    assert strato.get(f.ok.remote()) == "still alive"


def test_actor_constructor_error(strato_local):
    strato = strato_local

    @strato.remote
    class BadInit:
        def __init__(self):
            raise MyError("no init")

        def ping(self):
            return "pong"

    a = BadInit.remote()
    for _ in range(2):  # every call, not just the first
        with pytest.raises(exc.ActorDiedError) as info:
            strato.get(a.ping.remote(), timeout=30)
        assert not isinstance(info.value, MyError)
        assert isinstance(info.value, exc.RayActorError)
        text = str(info.value)
        assert "MyError: no init" in text and "Traceback" in text and "__init__" in text
        assert isinstance(info.value.cause, MyError)
        assert "in __init__" in info.value.traceback_str


def test_actor_handle_passed_to_tasks(strato_local):
    strato = strato_local

    @strato.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n

        def get(self):
            return self.n

    @strato.remote
    def bump(counter, times):
        return strato.get([counter.inc.remote() for _ in range(times)])[-1]

    c = Counter.remote()
    strato.get([bump.remote(c, 10) for _ in range(3)])
    assert strato.get(c.get.remote()) == 30
    # a handle nested in a container works too
    assert strato.get(strato.remote(lambda d: strato.get(d["c"].get.remote())).remote({"c": c})) == 30


def test_threaded_actor_runs_calls_concurrently(strato_local):
    strato = strato_local

    @strato.remote(max_concurrency=4)
    class Threaded:
        def __init__(self):
            self.barrier = threading.Barrier(4, timeout=20)

        def meet(self):
            # returns only once 4 calls are inside at the same time
            return self.barrier.wait()

    a = Threaded.remote()
    assert sorted(strato.get([a.meet.remote() for _ in range(4)], timeout=40)) == [0, 1, 2, 3]


def test_async_actor_runs_calls_concurrently(strato_local):
    strato = strato_local

    @strato.remote
    class AsyncActor:
        def __init__(self):
            self.inside = 0
            self.all_in = None

        async def meet(self, n):
            if self.all_in is None:
                self.all_in = asyncio.Event()
            self.inside += 1
            if self.inside == n:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), 20)
            return self.inside

        async def nap(self):
            await asyncio.sleep(1.0)
            return "rested"

    a = AsyncActor.remote()
    assert strato.get([a.meet.remote(10) for _ in range(10)], timeout=40) == [10] * 10
    t0 = time.monotonic()
    assert strato.get([a.nap.remote() for _ in range(8)], timeout=40) == ["rested"] * 8
    assert time.monotonic() - t0 < 6  # 8 one-second naps overlap


def test_named_actor_and_get_actor(strato_local):
    strato = strato_local

    @strato.remote
    class Box:
        def __init__(self, v):
            self.v = v

        def get(self):
            return self.v

    box = Box.options(name="the-box").remote("content")
    assert strato.get(box.get.remote()) == "content"
    found = strato.get_actor("the-box")
    assert strato.get(found.get.remote()) == "content"
    with pytest.raises(ValueError):
        Box.options(name="the-box").remote("duplicate")
    same = Box.options(name="the-box", get_if_exists=True).remote("ignored")
    assert strato.get(same.get.remote()) == "content"
    with pytest.raises(ValueError):
        strato.get_actor("no-such-actor")
    # namespaces keep names apart
    other = Box.options(name="the-box", namespace="other-ns").remote("elsewhere")
    assert strato.get(other.get.remote()) == "elsewhere"
    assert strato.get(strato.get_actor("the-box", namespace="other-ns").get.remote()) == "elsewhere"
    assert strato.get(strato.get_actor("the-box").get.remote()) == "content"
    strato.kill(box)
    strato.kill(other)


def _run_driver(temp_dir: str, code: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import strato
        strato.init(address="auto", temp_dir={temp_dir!r})
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=os.getcwd())


def test_detached_actor_outlives_its_driver(strato_local):
    strato = strato_local
    from strato.runtime import api

    temp_dir = api._state["temp_dir"]
    proc = _run_driver(temp_dir, """
        @strato.remote
        class Keeper:
            def __init__(self): self.v = "kept"
            def get(self): return self.v
        d = Keeper.options(name="detached-keeper", lifetime="detached").remote()
        t = Keeper.options(name="job-keeper").remote()
        assert strato.get([d.get.remote(), t.get.remote()]) == ["kept", "kept"]
        strato.shutdown()
    """)
    assert proc.returncode == 0, proc.stderr
    detached = strato.get_actor("detached-keeper")
    assert strato.get(detached.get.remote(), timeout=30) == "kept"

    def job_actor_gone():
        try:
            handle = strato.get_actor("job-keeper")
        except ValueError:
            return True
        try:
            strato.get(handle.get.remote(), timeout=5)
        except exc.ActorDiedError:
            return True
        return False
    wait_until(job_actor_gone, 20, 0.2, "the non-detached actor to die with its job")
    strato.kill(detached)


def test_kill_actor(strato_local):
    strato = strato_local

    @strato.remote(max_restarts=2)
    class Victim:
        def ping(self):
            return "pong"

    v = Victim.remote()
    assert strato.get(v.ping.remote()) == "pong"
    strato.kill(v)  # no_restart=True by default: max_restarts does not bring it back
    with pytest.raises(exc.ActorDiedError):
        strato.get(v.ping.remote(), timeout=30)
    with pytest.raises(TypeError):
        strato.kill("not an actor")


def test_actor_max_restarts_resets_state(strato_local):
    strato = strato_local

    @strato.remote(max_restarts=1)
    class Phoenix:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n

        def pid(self):
            return os.getpid()

        def die(self):
            os._exit(1)

    p = Phoenix.remote()
    assert strato.get([p.inc.remote(), p.inc.remote()]) == [1, 2]
    first_pid = strato.get(p.pid.remote())
    with pytest.raises(exc.ActorUnavailableError, match="restarting"):  # an ActorError
        strato.get(p.die.remote(), timeout=30)

    def restarted():
        try:
            return strato.get(p.inc.remote(), timeout=10)
        except exc.ActorUnavailableError:
            return None
    assert wait_until(restarted, 30, 0.2, "the actor to restart") == 1  # state reset
    assert strato.get(p.pid.remote()) != first_pid
    assert strato.get(p.inc.remote()) == 2
    # the one restart is used up: the next death is final
    with pytest.raises(exc.ActorDiedError):
        strato.get(p.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError):
        strato.get(p.inc.remote(), timeout=30)


def test_actor_without_restarts_dies(strato_local):
    strato = strato_local

    @strato.remote
    class Mortal:
        def die(self):
            os._exit(1)

        def ping(self):
            return "pong"

    m = Mortal.remote()
    assert strato.get(m.ping.remote()) == "pong"
    with pytest.raises(exc.ActorDiedError):
        strato.get(m.die.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError):
        strato.get(m.ping.remote(), timeout=30)


def test_actor_crash_mid_call_is_rerun_on_the_restarted_process(strato_local, tmp_path):
    strato = strato_local
    marker = str(tmp_path / "crashed-once")

    @strato.remote(max_restarts=1, max_task_retries=1)
    class Flaky:
        def work(self, marker):
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)   # the process dies during the call, the first time only
            return os.getpid()

    f = Flaky.remote()
    pid = strato.get(f.work.remote(marker), timeout=30)   # re-run, not an error
    with open(marker) as fh:
        first_pid = int(fh.read())
    assert pid != first_pid
    assert strato.get(f.work.remote(marker), timeout=30) == pid   # the new process serves


def test_actor_crash_mid_call_retries_run_out(strato_local):
    strato = strato_local

    @strato.remote(max_restarts=3, max_task_retries=1)
    class AlwaysDies:
        def die(self):
            os._exit(1)

        def ping(self):
            return "pong"

    a = AlwaysDies.remote()
    # first run and one re-run both kill the process: then the caller is told
    with pytest.raises(exc.ActorUnavailableError, match="restarting"):
        strato.get(a.die.remote(), timeout=30)

    def alive():
        try:
            return strato.get(a.ping.remote(), timeout=10)
        except exc.ActorUnavailableError:
            return None
    assert wait_until(alive, 30, 0.2, "the actor to come back") == "pong"
