"""The API around the work: runtime context, nodes and resources, worker output,
clear errors for bad input, and `import strato as ray`."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(60)


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
