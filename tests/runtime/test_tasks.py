"""Tasks on the embedded default cluster (one node, 2 CPUs, real processes): running,
nesting, refs, objects, get/wait, errors and num_returns.

Tests that need their own ``init`` arguments live in test_api_init.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from strato import exceptions as exc
from tests.runtime.api_helpers import MyError, touch, wait_for_file

pytestmark = pytest.mark.timeout(60)


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
