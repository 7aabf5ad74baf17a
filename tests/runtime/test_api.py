"""End-to-end API semantics on the embedded default cluster (one node, 2 CPUs, real processes).

Tests that need their own ``init`` arguments live in test_api_init.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(60)


class MyError(Exception):
    """A user exception type; must survive the trip back as itself."""


def wait_for_file(path: str, timeout: float = 30.0) -> None:
    """Block (in a task) until ``path`` exists; bounded."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate file {path} never appeared")
        time.sleep(0.02)


def touch(path) -> None:
    with open(path, "w"):
        pass


# ------------------------------------------------------------------ tasks
def test_tasks_run_and_return(strato_local):
    strato = strato_local

    @strato.remote
    def square(x):
        return x * x

    assert strato.get([square.remote(i) for i in range(200)]) == [i * i for i in range(200)]
    assert strato.get(square.remote(7)) == 49


def test_remote_functions_made_in_a_loop_stay_distinct(strato_local):
    strato = strato_local

    def make(v):
        @strato.remote
        def f():
            return v
        return f

    # each function object is freed after use: a new one may reuse its memory address
    assert [strato.get(make(i).remote(), timeout=30) for i in range(10)] == list(range(10))

    def make_class(v):
        @strato.remote
        class A:
            def get(self):
                return v
        return A

    assert [strato.get(make_class(i).remote().get.remote(), timeout=30) for i in range(5)] \
        == list(range(5))


def test_nested_tasks(strato_local):
    strato = strato_local

    @strato.remote
    def leaf(x):
        return x + 1

    @strato.remote
    def parent(n):
        return sum(strato.get([leaf.remote(i) for i in range(n)]))

    # the first nested call of a fresh session, then more parents than CPUs: workers
    # blocked in get() must not deadlock the node
    first = parent.remote(3)
    refs = [parent.remote(5) for _ in range(4)]
    try:
        assert strato.get(first, timeout=20) == 6
        assert strato.get(refs, timeout=20) == [15] * 4
    finally:
        for ref in [first, *refs]:  # leave no blocked workers behind for later tests
            strato.cancel(ref, force=True)


def test_top_level_refs_resolved_nested_refs_stay_refs(strato_local):
    strato = strato_local

    @strato.remote
    def inspect_args(x, nested, *, kw):
        return (type(x).__name__, type(nested[0]).__name__, type(nested[1]["r"]).__name__,
                type(kw).__name__, strato.get(nested[0]))

    ref = strato.put(5)
    produced = strato.remote(lambda: "made").remote()
    out = strato.get(inspect_args.remote(ref, [ref, {"r": produced}], kw=produced))
    assert out == ("int", "ObjectRef", "ObjectRef", "str", 5)


def test_refs_made_inside_a_task_outlive_it(strato_local):
    strato = strato_local

    @strato.remote
    def make_refs():
        # small (inline) and large (shared-memory) objects put by the worker, returned nested
        return [strato.put("small"), strato.put(np.full(1_000_000, 3, dtype=np.int64))]

    small, big = strato.get(make_refs.remote(), timeout=30)
    assert strato.get(small, timeout=30) == "small"
    assert int(strato.get(big, timeout=30).sum()) == 3_000_000

    @strato.remote
    def total(refs):
        return int(strato.get(refs[0]).sum())

    assert strato.get(total.remote([big]), timeout=30) == 3_000_000


def test_put_get_values(strato_local):
    strato = strato_local
    values = [None, 1, "text", b"\x00" * 10, {"a": [1, 2]}, (1, 2.5), list(range(10_000)),
              b"x" * (2 * 1024 * 1024)]
    refs = [strato.put(v) for v in values]
    assert all(isinstance(r, strato.ObjectRef) for r in refs)
    assert strato.get(refs) == values
    assert strato.get(refs[2]) == "text"
    with pytest.raises(TypeError):
        strato.get("not a ref")


def test_numpy_zero_copy_read_only(strato_local):
    strato = strato_local
    arr = np.arange(2_000_000, dtype=np.int64)  # 16 MB: goes to the shared-memory store
    out = strato.get(strato.put(arr))
    assert isinstance(out, np.ndarray)
    assert out.flags.writeable is False
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(ValueError):
        out[0] = 1

    @strato.remote
    def make(n):
        return np.full(n, 3.0)

    made = strato.get(make.remote(1_000_000))
    assert made.flags.writeable is False
    assert made.shape == (1_000_000,) and float(made.sum()) == 3_000_000.0

    @strato.remote
    def total(a):
        return int(a.sum()), a.flags.writeable

    # a large array passed by value goes through the store; the task reads it zero-copy too
    assert strato.get(total.remote(arr)) == (int(arr.sum()), False)


def test_get_timeout(strato_local, tmp_path):
    strato = strato_local
    gate = str(tmp_path / "gate")

    @strato.remote
    def blocked(path):
        wait_for_file(path)
        return "done"

    ref = blocked.remote(gate)
    t0 = time.monotonic()
    with pytest.raises(exc.GetTimeoutError):
        strato.get(ref, timeout=0.3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(TimeoutError):  # GetTimeoutError is also a TimeoutError, as in Ray
        strato.get([ref], timeout=0)
    touch(gate)
    assert strato.get(ref, timeout=30) == "done"


def test_wait(strato_local, tmp_path):
    strato = strato_local
    gate = str(tmp_path / "gate")

    @strato.remote
    def blocked(path):
        wait_for_file(path)
        return "slow"

    @strato.remote
    def fast():
        return "fast"

    slow_ref, fast_ref = blocked.remote(gate), fast.remote()
    ready, not_ready = strato.wait([slow_ref, fast_ref], num_returns=1, timeout=30)
    assert ready == [fast_ref] and not_ready == [slow_ref]
    t0 = time.monotonic()
    ready, not_ready = strato.wait([slow_ref, fast_ref], num_returns=2, timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert ready == [fast_ref] and not_ready == [slow_ref]
    touch(gate)
    ready, not_ready = strato.wait([slow_ref, fast_ref], num_returns=2, timeout=30)
    assert set(ready) == {slow_ref, fast_ref} and not_ready == []
    with pytest.raises(ValueError):
        strato.wait([fast_ref], num_returns=2)


def test_task_error_is_user_type_and_task_error(strato_local):
    strato = strato_local

    @strato.remote
    def fails(x):
        raise MyError(f"bad value {x}")

    with pytest.raises(MyError) as info:
        strato.get(fails.remote(42))
    err = info.value
    assert isinstance(err, exc.TaskError)
    assert isinstance(err, exc.StratoError)
    assert "bad value 42" in str(err)
    assert "Traceback" in err.traceback_str
    assert "fails" in err.traceback_str and "MyError" in err.traceback_str



def test_error_propagates_through_dependent_task(strato_local):
    strato = strato_local

    @strato.remote
    def div(a, b):
        return a / b

    @strato.remote
    def plus_one(x):
        return x + 1

    with pytest.raises(ZeroDivisionError):
        strato.get(div.remote(1, 0), timeout=20)
    # the dependent task fails with the upstream error instead of waiting forever
    with pytest.raises(ZeroDivisionError) as info:
        strato.get(plus_one.remote(div.remote(1, 0)), timeout=20)
    assert isinstance(info.value, exc.TaskError)


def test_unpicklable_exception_still_reported(strato_local):
    strato = strato_local

    @strato.remote
    def fails():
        class Weird(Exception):
            def __init__(self):
                super().__init__("weird")
                self.lock = threading.Lock()
        raise Weird()

    with pytest.raises(exc.TaskError) as info:
        strato.get(fails.remote())
    assert "Weird" in str(info.value)


def test_num_returns(strato_local):
    strato = strato_local

    @strato.remote(num_returns=3)
    def three():
        return 1, "two", [3]

    a, b, c = three.remote()
    assert strato.get([a, b, c]) == [1, "two", [3]]

    @strato.remote
    def pair():
        return "x", "y"

    refs = pair.options(num_returns=2).remote()
    assert strato.get(refs) == ["x", "y"]

    @strato.remote(num_returns=2)
    def wrong():
        return 1, 2, 3

    with pytest.raises(exc.TaskError):
        strato.get(wrong.remote()[0])


def test_options_override(strato_local):
    strato = strato_local

    @strato.remote(num_cpus=1)
    def resources_seen():
        return strato.get_runtime_context().get_assigned_resources()

    assert strato.get(resources_seen.remote()).get("CPU") == 1.0
    assert strato.get(resources_seen.options(num_cpus=0.5).remote()).get("CPU") == 0.5
    # the original keeps its options
    assert strato.get(resources_seen.remote()).get("CPU") == 1.0


def test_max_retries_after_worker_crash(strato_local, tmp_path):
    strato = strato_local
    marker = str(tmp_path / "crashed-once")

    @strato.remote(max_retries=2)
    def crash_once(path):
        if not os.path.exists(path):
            touch(path)
            os._exit(1)
        return "survived"

    assert strato.get(crash_once.remote(marker), timeout=30) == "survived"


def test_worker_crash_without_retries(strato_local):
    strato = strato_local

    @strato.remote(max_retries=0)
    def crash():
        os._exit(1)

    with pytest.raises(exc.WorkerCrashedError):
        strato.get(crash.remote(), timeout=30)

    @strato.remote
    def ok():
        return "pool recovered"

    assert strato.get(ok.remote(), timeout=30) == "pool recovered"


def test_retry_exceptions(strato_local, tmp_path):
    strato = strato_local

    @strato.remote
    def flaky(path, exc_type):
        if not os.path.exists(path):
            touch(path)
            raise exc_type("first attempt fails")
        return "second attempt"

    m1, m2, m3 = (str(tmp_path / n) for n in ("m1", "m2", "m3"))
    assert strato.get(flaky.options(max_retries=1, retry_exceptions=True).remote(m1, MyError),
                      timeout=30) == "second attempt"
    # without retry_exceptions an application error is not retried
    with pytest.raises(MyError):
        strato.get(flaky.options(max_retries=3).remote(m2, MyError), timeout=30)
    # a list retries only the listed types
    with pytest.raises(KeyError):
        strato.get(flaky.options(max_retries=3, retry_exceptions=[MyError]).remote(m3, KeyError),
                   timeout=30)
    m4 = str(tmp_path / "m4")
    assert strato.get(flaky.options(max_retries=1, retry_exceptions=[MyError]).remote(m4, MyError),
                      timeout=30) == "second attempt"


def test_cancel_sleeping_task(strato_local, tmp_path):
    strato = strato_local
    started = str(tmp_path / "started")

    @strato.remote(max_retries=0)
    def sleeper(path):
        touch(path)
        time.sleep(30)
        return "not cancelled"

    ref = sleeper.remote(started)
    try:
        wait_until(lambda: os.path.exists(started), 30, message="the task to start")
        t0 = time.monotonic()
        strato.cancel(ref)
        with pytest.raises(exc.TaskCancelledError):
            strato.get(ref, timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        strato.cancel(ref, force=True)  # no sleeping worker left behind if this failed


def test_cancel_busy_loop_task(strato_local, tmp_path):
    strato = strato_local
    started = str(tmp_path / "started")

    @strato.remote(max_retries=0)
    def spinner(path):
        touch(path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "not cancelled"

    ref = spinner.remote(started)
    try:
        wait_until(lambda: os.path.exists(started), 30, message="the task to start")
        strato.cancel(ref)
        with pytest.raises(exc.TaskCancelledError):
            strato.get(ref, timeout=10)
    finally:
        strato.cancel(ref, force=True)


def test_cancel_force(strato_local, tmp_path):
    strato = strato_local
    started = str(tmp_path / "started")

    @strato.remote(max_retries=3)
    def stubborn(path):
        touch(path)
        while True:  # ignores KeyboardInterrupt: only force can stop it
            try:
                time.sleep(30)
                return "not cancelled"
            except KeyboardInterrupt:
                pass

    ref = stubborn.remote(started)
    wait_until(lambda: os.path.exists(started), 30, message="the task to start")
    strato.cancel(ref, force=True)
    with pytest.raises(exc.TaskCancelledError):  # not retried although max_retries=3
        strato.get(ref, timeout=20)

    @strato.remote
    def ok():
        return "ok"

    assert strato.get(ok.remote(), timeout=30) == "ok"


def test_cancel_queued_task(strato_local, tmp_path):
    strato = strato_local
    gate = str(tmp_path / "gate")

    @strato.remote
    def blocked(path):
        wait_for_file(path)
        return "ran"

    holders = [blocked.remote(gate) for _ in range(2)]  # both CPUs busy
    queued = blocked.remote(gate)
    try:
        strato.cancel(queued)
        with pytest.raises(exc.TaskCancelledError):
            strato.get(queued, timeout=10)
    finally:
        touch(gate)
    assert strato.get(holders, timeout=30) == ["ran", "ran"]


# ------------------------------------------------------------------ actors
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
    with pytest.raises((exc.ActorDiedError, MyError)):
        strato.get(a.ping.remote(), timeout=30)


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


# ------------------------------------------------------------------ introspection
def test_runtime_context_ids(strato_local):
    strato = strato_local
    driver_ctx = strato.get_runtime_context()
    assert driver_ctx.get_task_id() is None and driver_ctx.get_actor_id() is None

    @strato.remote
    def ids():
        ctx = strato.get_runtime_context()
        return ctx.get_job_id(), ctx.get_node_id(), ctx.get_task_id(), ctx.get_actor_id()

    job, node, task1, actor = strato.get(ids.remote())
    _, _, task2, _ = strato.get(ids.remote())
    assert job == driver_ctx.get_job_id()
    assert node == driver_ctx.get_node_id() == strato.nodes()[0]["NodeID"]
    assert task1 and task2 and task1 != task2
    assert actor is None

    @strato.remote
    class Who:
        def ids(self):
            ctx = strato.get_runtime_context()
            return ctx.get_actor_id(), ctx.get_node_id()

    w = Who.remote()
    actor_id, node_id = strato.get(w.ids.remote())
    assert actor_id == w._actor_id.hex()
    assert node_id == driver_ctx.get_node_id()


def test_nodes_and_resources(strato_local):
    strato = strato_local
    nodes = strato.nodes()
    assert len(nodes) == 1
    node = nodes[0]
    assert node["Alive"] is True
    assert node["Resources"]["CPU"] == 2.0
    assert strato.cluster_resources()["CPU"] == 2.0
    wait_until(lambda: strato.available_resources().get("CPU") == 2.0, 10,
               message="both CPUs to be free")
    assert set(strato.cluster_resources()) >= {"CPU", "memory"}


def test_worker_print_reaches_driver_with_prefix(strato_local, capfd):
    strato = strato_local

    @strato.remote
    def chatty(token):
        print(f"hello from the worker {token}", flush=True)
        print(f"to stderr {token}", file=sys.stderr, flush=True)
        return os.getpid()

    token = f"tok-{time.time_ns()}"
    pid = strato.get(chatty.remote(token))
    seen = []

    def both_lines():
        out, err = capfd.readouterr()
        seen.append(out + err)
        text = "".join(seen)
        return f"hello from the worker {token}" in text and f"to stderr {token}" in text
    wait_until(both_lines, 20, 0.05, "the worker's output on the driver")
    text = "".join(seen)
    line = next(ln for ln in text.splitlines() if f"hello from the worker {token}" in ln)
    assert line.startswith("(") and f"pid={pid}" in line.split(")")[0], line


# ------------------------------------------------------------------ bad input
def test_bad_input_clear_errors(strato_local):
    strato = strato_local

    @strato.remote
    def f(x):
        return x

    @strato.remote
    class A:
        def m(self):
            return 1

    with pytest.raises(TypeError, match="remote"):
        f(1)
    with pytest.raises(TypeError, match="remote"):
        A()
    a = A.remote()
    with pytest.raises(TypeError, match="remote"):
        a.m()
    with pytest.raises(AttributeError):
        a.no_such_method.remote()
    with pytest.raises(TypeError) as info:
        f.remote(threading.Lock())
    assert "lock" in str(info.value).lower()
    with pytest.raises(ValueError, match="num_cpu"):
        f.options(num_cpu=1)
    with pytest.raises(ValueError, match="bogus_option"):
        strato.remote(bogus_option=1)(lambda: None)
    with pytest.raises(ValueError, match="max_restart"):
        A.options(max_restart=1)
    with pytest.raises(ValueError):
        f.options(num_cpus=-1)
    with pytest.raises(ValueError):
        f.options(num_gpus=-0.5)
    with pytest.raises(ValueError, match="slot"):
        f.options(resources={"slot": -1})
    with pytest.raises(ValueError):
        A.options(num_cpus=-2)
    with pytest.raises(ValueError):
        f.options(num_returns=0)
    with pytest.raises(TypeError):
        strato.remote(42)
    # nothing above broke the session
    assert strato.get(f.remote("fine")) == "fine"


def test_init_twice(strato_local):
    strato = strato_local
    with pytest.raises(RuntimeError):
        strato.init()
    info = strato.init(ignore_reinit_error=True)
    assert info is not None and strato.is_initialized()


def test_import_strato_as_ray(strato_local):
    import strato as ray

    ray.init(ignore_reinit_error=True)
    assert ray.is_initialized()

    @ray.remote
    def add(a, b):
        return a + b

    @ray.remote(num_cpus=1)
    class Accumulator:
        def __init__(self):
            self.total = 0

        def add(self, x):
            self.total += x
            return self.total

    refs = [add.remote(i, i) for i in range(10)]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
    assert len(ready) == 10
    assert sum(ray.get(refs)) == 90
    acc = Accumulator.options(name="acc-ray-style").remote()
    ray.get([acc.add.remote(x) for x in ray.get(refs)])
    assert ray.get(ray.get_actor("acc-ray-style").add.remote(0)) == 90
    big = ray.put(np.zeros((256, 256)))
    assert ray.get(add.remote(big, 1)).sum() == 256 * 256
    assert isinstance(big, ray.ObjectRef)
    assert ray.cluster_resources()["CPU"] >= 1
    assert ray.get_runtime_context().get_job_id()

    @ray.remote
    def fail():
        raise KeyError("missing")

    with pytest.raises(ray.exceptions.RayTaskError):  # Ray's exception names still catch
        ray.get(fail.remote())
    assert ray.get_gpu_ids() == []
    try:
        ray.get(add.remote(1, "x"))
    except TypeError as e:  # the user's exception type
        assert isinstance(e, ray.exceptions.TaskError)
    else:
        raise AssertionError("expected a TypeError")
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray.get(ray.remote(lambda: time.sleep(5)).remote(), timeout=0.1)
    ray.kill(acc)


# ------------------------------------------------------------------ object store memory
@pytest.mark.timeout(120)
def test_put_get_loop_keeps_memory_flat(strato_local):
    strato = strato_local
    from strato.runtime.core import current

    shm_dir = current().store_paths[0]

    def store_bytes():
        total = 0
        with os.scandir(shm_dir) as it:
            for e in it:
                try:
                    total += e.stat().st_size
                except FileNotFoundError:
                    pass
        return total

    limit = 50 * 1024 * 1024
    payload = np.ones(1024 * 1024, dtype=np.uint8)
    peak = 0
    for i in range(10_000):
        payload[0] = i % 256
        out = strato.get(strato.put(payload))
        assert out[0] == i % 256
        if i % 250 == 0:
            peak = max(peak, store_bytes())
            assert peak < limit, f"store grew to {peak / 2**20:.0f} MB after {i} put/get"
    del out
    wait_until(lambda: store_bytes() < limit, 20, 0.1, "the store to free the objects")
    used = [n["ObjectStoreUsed"] for n in strato.nodes()]
    wait_until(lambda: strato.nodes()[0]["ObjectStoreUsed"] < limit, 20, 0.1,
               f"the node's store accounting to drop (saw {used})")
