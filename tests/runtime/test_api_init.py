"""Single-node tests that need their own ``strato.init`` arguments (one cluster per test)."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import psutil
import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(60)


def test_nested_task_right_after_init(strato_local_fn):
    strato = strato_local_fn(num_cpus=2)

    @strato.remote
    def leaf(x):
        return x + 1

    @strato.remote
    def parent():
        return strato.get(leaf.remote(1))

    ref = parent.remote()
    try:
        assert strato.get(ref, timeout=20) == 2
    finally:
        strato.cancel(ref, force=True)


def _peak_overlap(spans) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:  # ends sort before starts at the same instant
        running += delta
        peak = max(peak, running)
    return peak


def test_first_tasks_after_init_run_in_parallel(strato_local_fn):
    strato = strato_local_fn(num_cpus=2)

    @strato.remote
    def span():
        start = time.time()
        time.sleep(0.5)
        return start, time.time()

    spans = strato.get([span.remote() for _ in range(4)], timeout=30)
    assert _peak_overlap(spans) == 2, f"2 CPUs but the tasks ran one at a time: {spans}"


def test_custom_resource_limits_concurrency(strato_local_fn, tmp_path):
    strato = strato_local_fn(num_cpus=4, resources={"slot": 2})
    assert strato.cluster_resources()["slot"] == 2.0
    # warm the worker pool so the measurement below is about the slot limit alone
    strato.get([strato.remote(lambda: time.sleep(0.3)).remote() for _ in range(4)], timeout=30)

    @strato.remote(resources={"slot": 1})
    def hold(i, out_dir):
        start = time.time()
        time.sleep(0.5)
        end = time.time()
        with open(os.path.join(out_dir, f"{i}.txt"), "w") as f:
            f.write(f"{start} {end}")
        return i

    assert sorted(strato.get([hold.remote(i, str(tmp_path)) for i in range(6)], timeout=40)) \
        == list(range(6))
    spans = []
    for i in range(6):
        start, end = map(float, (tmp_path / f"{i}.txt").read_text().split())
        spans.append((start, end))
    peak = _peak_overlap(spans)
    assert peak == 2, f"at most 2 tasks may hold a slot at once (and 2 should): peak {peak}"

    # a shape no node has is infeasible: a warning, the task stays pending, not an error
    @strato.remote(resources={"no_such_thing": 1})
    def never():
        return "ran"

    ref = never.remote()
    with pytest.raises(exc.GetTimeoutError):
        strato.get(ref, timeout=1)
    strato.cancel(ref)


def test_infeasible_task_warns_and_shows_in_demand(strato_local_fn, capfd):
    strato = strato_local_fn(num_cpus=1)
    from strato.runtime.head_client import HeadClient

    @strato.remote(num_cpus=64)
    def huge():
        return "ran"

    ref = huge.remote()
    seen = []

    def warned():
        out, err = capfd.readouterr()
        seen.append(out + err)
        return "infeasible" in "".join(seen).lower()
    wait_until(warned, 15, 0.1, "an infeasible-task warning on the driver")
    with pytest.raises(exc.GetTimeoutError):
        strato.get(ref, timeout=0.5)

    def demand_has_shape():
        demand = HeadClient().demand()
        return "64" in repr(demand) and demand
    demand = wait_until(demand_has_shape, 10, 0.1, "the 64-CPU shape in the head's demand")
    assert "CPU" in repr(demand)
    strato.cancel(ref)


def test_num_gpus_assigns_ids_and_cuda_visible_devices(strato_local_fn):
    strato = strato_local_fn(num_cpus=2, num_gpus=2)
    assert strato.cluster_resources()["GPU"] == 2.0

    @strato.remote(num_gpus=1)
    def gpu_task():
        return strato.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    ids, visible = strato.get(gpu_task.remote())
    assert len(ids) == 1 and int(ids[0]) in (0, 1)
    assert visible == str(ids[0])

    @strato.remote(num_gpus=2)
    def two_gpus():
        return sorted(int(i) for i in strato.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES")

    ids2, visible2 = strato.get(two_gpus.remote())
    assert ids2 == [0, 1]
    assert sorted(int(x) for x in visible2.split(",")) == [0, 1]

    @strato.remote(num_gpus=1)
    class GpuActor:
        def ids(self):
            return strato.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    a, b = GpuActor.remote(), GpuActor.remote()
    (ids_a, vis_a), (ids_b, vis_b) = strato.get([a.ids.remote(), b.ids.remote()], timeout=30)
    assert len(ids_a) == len(ids_b) == 1 and ids_a != ids_b  # two actors, two distinct GPUs
    assert vis_a == str(ids_a[0]) and vis_b == str(ids_b[0])

    @strato.remote
    def no_gpu():
        return strato.get_gpu_ids()

    assert strato.get(no_gpu.remote()) == []
    # both GPUs are held by the actors: a GPU task waits
    with pytest.raises(exc.GetTimeoutError):
        strato.get(gpu_task.remote(), timeout=1)


@pytest.mark.timeout(120)
def test_spills_to_disk_when_store_is_full(strato_local_fn):
    strato = strato_local_fn(num_cpus=1, object_store_memory=50 * 1024 * 1024)
    mb20 = 20 * 1024 * 1024 // 8
    refs = []
    for i in range(10):
        arr = np.full(mb20, i, dtype=np.int64)
        arr[-1] = -i
        refs.append(strato.put(arr))
    for i, ref in enumerate(refs):
        out = strato.get(ref, timeout=30)
        assert out.shape == (mb20,)
        assert out[0] == i and out[-1] == -i and int(out[:-1].sum()) == i * (mb20 - 1)
        del out
    # a task can read a spilled object too
    @strato.remote
    def first_value(a):
        return int(a[0])

    assert strato.get(first_value.remote(refs[0]), timeout=30) == 0


def test_shutdown_stops_processes_and_frees_shared_memory(strato_local_fn):
    strato = strato_local_fn(num_cpus=1)
    from strato.runtime import api
    from strato.runtime.core import current

    node_pid = api._state["node_proc"].pid
    shm_dir = current().store_paths[0]

    @strato.remote
    def pid():
        return os.getpid()

    worker_pid = strato.get(pid.remote())
    ref = strato.put(np.ones(1_000_000))
    assert os.listdir(shm_dir)
    del ref
    strato.shutdown()
    assert not strato.is_initialized()
    wait_until(lambda: not psutil.pid_exists(node_pid) or
               psutil.Process(node_pid).status() == psutil.STATUS_ZOMBIE, 15, 0.1,
               "the node process to exit")
    wait_until(lambda: not psutil.pid_exists(worker_pid) or
               psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE, 15, 0.1,
               "the worker process to exit")
    assert not os.path.exists(shm_dir)
    with pytest.raises(exc.RuntimeNotInitializedError):
        strato.put(1)


def test_init_rejects_bad_arguments():
    import strato

    if strato.is_initialized():
        strato.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="strato-test-")
    try:
        with pytest.raises(ValueError, match="num_cpus"):
            strato.init(num_cpus=-1, temp_dir=temp_dir)
        with pytest.raises(ValueError, match="slot"):
            strato.init(resources={"slot": -2}, temp_dir=temp_dir)
        with pytest.raises(ConnectionError):
            strato.init(address="auto", temp_dir=temp_dir)  # nothing runs there
        assert not strato.is_initialized()
    finally:
        import shutil
        shutil.rmtree(temp_dir, ignore_errors=True)
