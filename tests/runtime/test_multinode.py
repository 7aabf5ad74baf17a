"""A head and two node agents on this machine (real processes, gRPC between them).

A = head (1 CPU), B (1 CPU, node_b=1), C (1 CPU, node_c=1); the driver is connected to A.
Tests that kill a node use their own cluster (``multinode_fn``) and run last.
"""

from __future__ import annotations

import gc
import glob
import os
import shutil
import tempfile
import time

import numpy as np
import psutil
import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(90)

MB50 = 50 * 1024 * 1024 // 8  # int64 elements in 50 MB


def wait_for_file(path: str, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate file {path} never appeared")
        time.sleep(0.02)


def write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


# ------------------------------------------------------------------ shared cluster
def test_cluster_view(multinode):
    import strato

    nodes = strato.nodes()
    assert len(nodes) == 3 and all(n["Alive"] for n in nodes)
    by_id = {n["NodeID"]: n for n in nodes}
    assert set(by_id) == {multinode.node_id(x) for x in "ABC"}
    assert by_id[multinode.node_id("B")]["Resources"].get("node_b") == 1.0
    assert by_id[multinode.node_id("C")]["Resources"].get("node_c") == 1.0
    total = strato.cluster_resources()
    assert total["CPU"] == 3.0 and total["node_b"] == 1.0 and total["node_c"] == 1.0
    assert strato.get_runtime_context().get_node_id() == multinode.node_id("A")


def test_spillback_placement(multinode):
    import strato

    @strato.remote
    def where():
        return strato.get_runtime_context().get_node_id()

    assert strato.get(where.options(resources={"node_b": 1}).remote(), timeout=30) \
        == multinode.node_id("B")
    assert strato.get(where.options(resources={"node_c": 0.5}).remote(), timeout=30) \
        == multinode.node_id("C")
    # many plain tasks: at least the head runs some; results are all correct
    ids = strato.get([where.remote() for _ in range(30)], timeout=60)
    assert set(ids) <= {multinode.node_id(x) for x in "ABC"}

    # a task on B submits a task that needs C: spills from B to C
    @strato.remote(resources={"node_b": 1})
    def from_b():
        return strato.get_runtime_context().get_node_id(), \
            strato.get(where.options(resources={"node_c": 1}).remote())

    assert strato.get(from_b.remote(), timeout=30) == (multinode.node_id("B"),
                                                       multinode.node_id("C"))


def test_actor_on_remote_node(multinode):
    import strato

    @strato.remote(resources={"node_c": 1})
    class Remote:
        def __init__(self):
            self.calls = 0

        def where(self):
            self.calls += 1
            return strato.get_runtime_context().get_node_id(), self.calls

    @strato.remote(resources={"node_b": 1})
    def call_from_b(actor):
        return [strato.get(actor.where.remote())[1] for _ in range(5)]

    a = Remote.remote()
    assert strato.get(a.where.remote(), timeout=30) == (multinode.node_id("C"), 1)
    assert strato.get(call_from_b.remote(a), timeout=30) == [2, 3, 4, 5, 6]
    refs = [a.where.remote() for _ in range(200)]
    assert [c for _, c in strato.get(refs, timeout=30)] == list(range(7, 207))
    strato.kill(a)


@pytest.mark.timeout(120)
def test_cross_node_transfer_50mb(multinode):
    import strato

    @strato.remote(resources={"node_b": 1})
    def produce():
        arr = np.arange(MB50, dtype=np.int64)
        arr[::4096] *= -1
        return strato.get_runtime_context().get_node_id(), arr

    node, arr = strato.get(produce.remote(), timeout=60)
    assert node == multinode.node_id("B")
    expected = np.arange(MB50, dtype=np.int64)
    expected[::4096] *= -1
    assert arr.dtype == np.int64 and arr.shape == (MB50,)
    np.testing.assert_array_equal(arr, expected)
    del arr

    # put on A, consumed by a task on C
    ref = strato.put(expected)

    @strato.remote(resources={"node_c": 1})
    def consume(a):
        return (strato.get_runtime_context().get_node_id(), a.shape, int(a.sum()),
                int(a[::4096].sum()), a.flags.writeable)

    node, shape, total, strided, writeable = strato.get(consume.remote(ref), timeout=60)
    assert node == multinode.node_id("C")
    assert shape == (MB50,)
    assert total == int(expected.sum()) and strided == int(expected[::4096].sum())
    assert writeable is False

    # a ref nested in a container is fetched from A by the task on C with get()
    @strato.remote(resources={"node_c": 1})
    def consume_nested(refs):
        a = strato.get(refs[0])
        return int(a[-1]), a.nbytes

    assert strato.get(consume_nested.remote([ref]), timeout=60) == (int(expected[-1]),
                                                                    expected.nbytes)


@pytest.mark.timeout(60)
def test_wait_fetch_local_means_in_the_local_store(multinode):
    """wait(fetch_local=True) reports an object on another node ready only once it is
    in this node's store (its fast path for all-ready refs must not skip the pull)."""
    import strato
    from strato.runtime.core import current

    @strato.remote(resources={"node_b": 1})
    def produce():
        return np.full(1_000_000, 5, dtype=np.int64)   # 8 MB: stays in B's store

    ref = produce.remote()
    ready, _ = strato.wait([ref], timeout=30, fetch_local=False)
    assert ready == [ref]
    local_copy = os.path.join(current().store_paths[0], ref.id.hex())
    assert not os.path.exists(local_copy)
    ready, _ = strato.wait([ref], timeout=30, fetch_local=True)
    assert ready == [ref] and os.path.exists(local_copy)
    assert int(strato.get(ref, timeout=30).sum()) == 5_000_000


@pytest.mark.timeout(60)
def test_get_pulls_a_result_that_arrives_just_before_it_waits(multinode, monkeypatch):
    """A result that lands on another node can reach the driver after get() asked for
    its missing objects and before it went to sleep (the notify then wakes nobody).
    get() must still pull it. It used to sleep for good: a two-node soak hung after
    6,000 rounds with such a result, located and never requested."""
    import threading

    import strato
    from strato.runtime.core import current

    @strato.remote(resources={"node_b": 1})
    def produce():
        return np.full(1_000_000, 9, dtype=np.int64)   # 8 MB: stays in B's store

    ref = produce.remote()
    ready, _ = strato.wait([ref], timeout=30, fetch_local=False)   # located, not pulled
    assert ready == [ref]
    core = current()
    real = core._request_missing
    skipped = []

    def late_result(refs, need_local):   # as if the result came just after this call
        if not skipped:
            skipped.append(True)
            return
        real(refs, need_local)
    monkeypatch.setattr(core, "_request_missing", late_result)
    out = []
    t = threading.Thread(target=lambda: out.append(int(strato.get(ref).sum())), daemon=True)
    t.start()
    t.join(20)
    assert skipped and out == [9_000_000]


@pytest.mark.timeout(90)
def test_task_args_pulled_from_another_node_are_freed(multinode):
    """Arguments owned on B (put by an actor there), pulled to C for tasks queued there
    (prefetched while they wait for C's one CPU): once the driver drops the refs, every
    copy goes, on C as on B. A prefetched copy used to stay until C stopped, so a stream
    of such tasks filled C's store and then its disk."""
    import strato

    @strato.remote(num_cpus=0, resources={"node_b": 0.01})
    class Maker:
        def make(self, n):
            return [strato.put(np.full(1 << 20, i, dtype=np.uint8)) for i in range(n)]

    @strato.remote(resources={"node_c": 0.01})
    def first_byte(x):
        return int(x[0])

    maker = Maker.remote()
    shm = {name: multinode.nodes[name].info["shm_dir"] for name in "BC"}

    def stored(name):
        return [f for f in os.listdir(shm[name]) if not f.startswith(".")]

    for _ in range(2):
        refs = strato.get(maker.make.remote(20), timeout=30)
        assert strato.get([first_byte.remote(r) for r in refs], timeout=60) == list(range(20))
        del refs
    wait_until(lambda: not stored("B") and not stored("C"), 30, 0.1,
               "the stores of B and C to empty")
    strato.kill(maker)


def test_refs_put_by_a_task_on_another_node_outlive_it(multinode):
    import strato

    @strato.remote(resources={"node_c": 1})
    def make_refs():
        return [strato.put("small"), strato.put(np.full(1_000_000, 3, dtype=np.int64))]

    small, big = strato.get(make_refs.remote(), timeout=30)
    assert strato.get(small, timeout=30) == "small"
    assert int(strato.get(big, timeout=30).sum()) == 3_000_000

    @strato.remote(resources={"node_b": 1})
    def total(refs):
        return int(strato.get(refs[0]).sum())

    assert strato.get(total.remote([big]), timeout=30) == 3_000_000


def test_wrong_token_join_is_refused(multinode):
    from strato.runtime.control import StartError, start_node, stop_nodes

    temp_dir = tempfile.mkdtemp(prefix="strato-mnD-")
    shm_before = set(glob.glob("/dev/shm/strato-*"))
    leaked = []
    try:
        with pytest.raises(StartError) as info:
            # TLS credentials of this cluster, but the wrong token: the token still counts
            start_node(head=False, address=multinode.address, token="not-the-token-4f2a9",
                       join_bundle=multinode.nodes["A"].join_bundle,
                       temp_dir=temp_dir, num_cpus=1, node_ip="127.0.0.1", timeout=30)
        assert "token" in str(info.value).lower()
        assert "not-the-token-4f2a9" not in str(info.value)  # a token is never echoed
    finally:
        stop_nodes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for path in set(glob.glob("/dev/shm/strato-*")) - shm_before:
            if not psutil.pid_exists(int(path.split("-")[1])):  # the refused node's store
                leaked.append(path)
                shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"the refused node left its shared-memory store behind: {leaked}"
    import strato
    assert len(strato.nodes()) == 3  # the refused node never joined


def test_spilled_tasks_one_after_another_while_head_busy(multinode, tmp_path):
    import strato

    gate = str(tmp_path / "gate")
    holders = _occupy_a_and_b(strato, multinode, gate, tmp_path)
    try:
        @strato.remote(num_cpus=1)
        def where():
            return strato.get_runtime_context().get_node_id()

        # each must spill to C, the one free CPU, as soon as the previous one finished there
        for i in range(3):
            assert strato.get(where.remote(), timeout=15) == multinode.node_id("C"), i
    finally:
        write(gate, "open")
    assert strato.get(holders, timeout=30) == ["held", "held"]


# ------------------------------------------------------------------ node failures
def _occupy_a_and_b(strato, cluster, gate: str, tmp_path) -> list:
    """Hold the only CPUs of A and B so the next 1-CPU task has to go to C."""
    @strato.remote(num_cpus=1, max_retries=0)
    def hold(marker, gate):
        write(marker, strato.get_runtime_context().get_node_id())
        wait_for_file(gate)
        return "held"

    a_marker, b_marker = str(tmp_path / "hold-a"), str(tmp_path / "hold-b")
    holders = [hold.remote(a_marker, gate),
               hold.options(resources={"node_b": 1}).remote(b_marker, gate)]
    wait_until(lambda: os.path.exists(a_marker) and os.path.exists(b_marker), 30, 0.05,
               "the holder tasks to start on A and B")
    with open(a_marker) as f:
        assert f.read() == cluster.node_id("A")
    # the cluster view must say so before we rely on it for placement
    wait_until(lambda: strato.available_resources().get("CPU", 0) == 1.0, 15, 0.05,
               "only C's CPU to be free")
    return holders


@pytest.mark.timeout(90)
def test_node_death_task_retried_elsewhere(multinode_fn, tmp_path):
    import strato

    cluster = multinode_fn
    gate = str(tmp_path / "gate")
    holders = _occupy_a_and_b(strato, cluster, gate, tmp_path)

    @strato.remote(num_cpus=1, max_retries=2)
    def long_task(marker_dir, gate):
        node = strato.get_runtime_context().get_node_id()
        write(os.path.join(marker_dir, f"attempt-{node}"), node)
        wait_for_file(gate)
        return node

    @strato.remote(num_cpus=0, resources={"node_c": 1}, max_retries=0)
    def no_retries(marker, gate):
        write(marker, "started")
        wait_for_file(gate)

    ref = long_task.remote(str(tmp_path), gate)
    c_marker = str(tmp_path / f"attempt-{cluster.node_id('C')}")
    lost_marker = str(tmp_path / "no-retries")
    lost = no_retries.remote(lost_marker, gate)
    wait_until(lambda: os.path.exists(c_marker) and os.path.exists(lost_marker), 30, 0.05,
               "the tasks to start on C")
    cluster.kill_node("C")
    cluster.wait_node_dead("C")
    with pytest.raises(exc.NodeDiedError, match="no retries left") as info:
        strato.get(lost, timeout=30)
    assert isinstance(info.value, exc.WorkerCrashedError)  # what Ray code catches
    write(gate, "open")  # frees A and B, and lets the retried attempt finish at once
    assert strato.get(holders, timeout=30) == ["held", "held"]
    node = strato.get(ref, timeout=45)
    assert node in (cluster.node_id("A"), cluster.node_id("B"))
    assert strato.cluster_resources()["CPU"] == 2.0


@pytest.mark.timeout(90)
def test_node_death_object_rebuilt_by_lineage(multinode_fn, tmp_path):
    import strato

    cluster = multinode_fn
    gate = str(tmp_path / "gate")
    holders = _occupy_a_and_b(strato, cluster, gate, tmp_path)

    @strato.remote(num_cpus=1, max_retries=2)
    def produce(marker_dir):
        node = strato.get_runtime_context().get_node_id()
        with open(os.path.join(marker_dir, "runs"), "a") as f:
            f.write(node + "\n")
        return np.full(1_000_000, 7, dtype=np.int64)  # 8 MB: stays in the producer's store

    ref = produce.remote(str(tmp_path))
    ready, _ = strato.wait([ref], num_returns=1, timeout=30, fetch_local=False)
    assert ready == [ref]
    with open(tmp_path / "runs") as f:
        assert f.read().split() == [cluster.node_id("C")]
    cluster.kill_node("C")
    cluster.wait_node_dead("C")
    write(gate, "open")
    assert strato.get(holders, timeout=30) == ["held", "held"]

    value = strato.get(ref, timeout=45)
    assert value.shape == (1_000_000,) and int(value.sum()) == 7_000_000
    with open(tmp_path / "runs") as f:
        runs = f.read().split()
    assert len(runs) == 2 and runs[1] in (cluster.node_id("A"), cluster.node_id("B"))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nested", [False, True], ids=["argument", "nested-in-argument"])
def test_node_death_rebuilds_a_chain_whose_inner_ref_was_dropped(multinode_fn, tmp_path,
                                                                nested):
    """``double.remote(produce.remote())``: the inner ref is gone as soon as the call is
    made (also as ``double.remote([produce.remote()])``). When the node holding both
    results dies, the owner rebuilds the outer result by re-running the chain: the inner
    result's lineage was kept, not its value."""
    import strato

    cluster = multinode_fn
    gate = str(tmp_path / "gate")
    holders = _occupy_a_and_b(strato, cluster, gate, tmp_path)

    @strato.remote(num_cpus=1, max_retries=2)
    def produce(marker_dir):
        with open(os.path.join(marker_dir, "produce"), "a") as f:
            f.write(strato.get_runtime_context().get_node_id() + "\n")
        return np.full(1_000_000, 7, dtype=np.int64)   # 8 MB: in the producer's store

    @strato.remote(num_cpus=1, max_retries=2)
    def double(x, marker_dir):
        if isinstance(x, list):
            x = strato.get(x[0])
        with open(os.path.join(marker_dir, "double"), "a") as f:
            f.write(strato.get_runtime_context().get_node_id() + "\n")
        return x * 2

    inner = produce.remote(str(tmp_path))
    # two results take it: both are rebuilt, the inner one once, for both at once
    refs = [double.remote([inner] if nested else inner, str(tmp_path)) for _ in range(2)]
    del inner
    ready, _ = strato.wait(refs, num_returns=2, timeout=30, fetch_local=False)
    assert ready == refs
    c = cluster.node_id("C")
    for name, runs in (("produce", [c]), ("double", [c, c])):
        with open(tmp_path / name) as f:
            assert f.read().split() == runs, name
    cluster.kill_node("C")
    cluster.wait_node_dead("C")
    write(gate, "open")
    assert strato.get(holders, timeout=30) == ["held", "held"]

    values = strato.get(refs, timeout=45)
    assert [int(v.sum()) for v in values] == [14_000_000] * 2
    for name, runs in (("produce", 2), ("double", 4)):
        with open(tmp_path / name) as f:
            assert len(f.read().split()) == runs, name
    # the inner result, rebuilt for the outer ones alone, is freed again (lineage kept)
    from strato.runtime.core import current

    def states():
        return sorted(e["state"] for e in current().rpc("debug_refs")["owned"].values()
                      if e["state"] != "ready" or e["owner_holds"] is False)
    wait_until(lambda: states() == ["freed"], 20, 0.05, "the rebuilt inner value to go")
    # once the outer result goes, the kept lineage goes with it: the owner holds nothing
    del refs, ready, values, holders
    gc.collect()
    try:
        wait_until(lambda: current().rpc("debug_state")["objects"] == 0, 20, 0.05,
                   "the owner's table to empty")
    except BaseException:
        print("left:", current().rpc("debug_refs"))
        raise


@pytest.mark.timeout(90)
def test_node_death_actor_restarted_elsewhere(multinode_fn, tmp_path):
    import strato

    cluster = multinode_fn
    gate = str(tmp_path / "gate")
    holders = _occupy_a_and_b(strato, cluster, gate, tmp_path)

    @strato.remote(num_cpus=1, max_restarts=1)
    class Survivor:
        def __init__(self):
            self.calls = 0

        def where(self):
            self.calls += 1
            return strato.get_runtime_context().get_node_id(), self.calls

    @strato.remote(num_cpus=1)
    class Mortal:
        def where(self):
            return strato.get_runtime_context().get_node_id()

    s = Survivor.remote()
    assert strato.get(s.where.remote(), timeout=30) == (cluster.node_id("C"), 1)
    write(gate, "open")
    assert strato.get(holders, timeout=30) == ["held", "held"]
    m = Mortal.options(num_cpus=0, resources={"node_c": 1}).remote()  # can live on C only
    assert strato.get(m.where.remote(), timeout=30) == cluster.node_id("C")

    cluster.kill_node("C")
    cluster.wait_node_dead("C")

    def restarted():
        try:
            return strato.get(s.where.remote(), timeout=10)
        except (exc.ActorUnavailableError, exc.GetTimeoutError):
            return None
        except exc.ActorDiedError:
            return None  # a call in flight while it died may fail; later calls must not
    node, calls = wait_until(restarted, 45, 0.2, "the actor to restart on another node")
    assert node in (cluster.node_id("A"), cluster.node_id("B"))
    assert calls == 1  # a fresh instance
    with pytest.raises(exc.ActorDiedError):
        strato.get(m.where.remote(), timeout=30)
