"""Borrowed references: an object whose ref travels nested in arguments, results, other
objects or an actor's state lives exactly as long as someone anywhere holds it, then
leaves the store, on one node and across nodes, also when a holder dies.

Every object here is 1 MB (in the shared-memory store, not inline). Each test checks the
value is still readable while any holder has it, then drops every handle and waits for
the store directories of every node to be empty (and the owner's table, where the driver
can ask it). Nothing calls ``flush_frees``: drops reach the agents on their own.
"""

from __future__ import annotations

import gc
import glob
import os
import signal
import time

import numpy as np
import pytest

from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
EMPTY_WITHIN_S = 20


def big(v: int) -> np.ndarray:
    return np.full(MB // 8, v, dtype=np.int64)   # 1 MB: stored, never inline


def _files(dirs) -> list[str]:
    out = []
    for d in dirs:
        try:
            out += [os.path.join(d, f) for f in os.listdir(d) if not f.startswith("pool-")]
        except FileNotFoundError:
            pass
    return out


def _local_dirs() -> list[str]:
    from strato.runtime.core import current

    return list(current().store_paths)


def _node_dirs(cluster) -> dict[str, list[str]]:
    return {n: glob.glob(f"/dev/shm/strato-{cluster.pid(n)}-*") for n in cluster.nodes}


def _owner_tables() -> dict:
    from strato.runtime.core import current

    state = current().rpc("debug_state")
    return {"objects": state["objects"], "borrowed": state["borrowed"]}


def wait_empty(dirs, what: str, tables: bool = True) -> None:
    """Every store dir in ``dirs`` holds no object (and the driver's agent owns and
    borrows nothing), within EMPTY_WITHIN_S."""
    def empty():
        gc.collect()
        return not _files(dirs) and (not tables or _owner_tables() == {"objects": 0,
                                                                       "borrowed": 0})
    try:
        wait_until(empty, EMPTY_WITHIN_S, 0.1, what)
    except BaseException:
        from strato.runtime.core import current

        print("left in the stores:", _files(dirs), "owner tables:", _owner_tables())
        print("the driver's agent:", current().rpc("debug_refs"))
        raise


@pytest.fixture
def local(strato_local):
    wait_empty(_local_dirs(), "an empty store before the test")
    return strato_local


# ------------------------------------------------------------------ one node
def test_a_nested_in_an_argument_of_a_task_that_keeps_nothing(local):
    strato = local

    @strato.remote
    def total(refs):
        return int(strato.get(refs[0]).sum()) + int(strato.get(refs[1]["r"]).sum())

    r1, r2 = strato.put(big(1)), strato.put(big(2))
    assert strato.get(total.remote([r1, {"r": r2}]), timeout=30) == (1 + 2) * MB // 8
    assert int(strato.get(r1).sum()) == MB // 8   # the driver still holds them
    del r1, r2
    wait_empty(_local_dirs(), "objects passed nested to a task to be freed")


def test_b_returned_nested_in_a_result(local):
    strato = local

    @strato.remote
    def make(n):
        return {"refs": [strato.put(big(i)) for i in range(n)]}

    @strato.remote
    def passthrough(refs):
        return [refs]     # a ref it did not make, returned nested again

    out = strato.get(make.remote(3), timeout=30)
    kept = out["refs"][2]
    del out                   # the result is dropped; one ref from it is still held
    gc.collect()
    time.sleep(0.3)
    assert int(strato.get(kept, timeout=30)[0]) == 2
    again = strato.get(passthrough.remote([kept]), timeout=30)[0][0]
    del kept
    gc.collect()
    time.sleep(0.3)
    assert int(strato.get(again, timeout=30)[0]) == 2
    del again
    wait_empty(_local_dirs(), "refs made by a task and returned nested to be freed")


def test_c_held_in_an_actors_state_then_dropped_or_killed(local):
    strato = local

    @strato.remote
    class Holder:
        def __init__(self, refs=None):
            self.refs = refs

        def hold(self, refs):
            self.refs = refs

        def total(self):
            return sum(int(strato.get(r).sum()) for r in self.refs)

        def drop(self):
            self.refs = None

    a = Holder.remote()
    r = strato.put(big(3))
    strato.get(a.hold.remote([r]), timeout=30)
    del r
    gc.collect()
    time.sleep(0.5)           # the driver's drop reached the owner: the actor keeps it
    assert strato.get(a.total.remote(), timeout=30) == 3 * MB // 8
    strato.get(a.drop.remote(), timeout=30)
    wait_empty(_local_dirs(), "an object an actor dropped to be freed")

    # given at creation, then the actor is killed
    r = strato.put(big(4))
    b = Holder.remote([r])
    del r
    gc.collect()
    time.sleep(0.5)
    assert strato.get(b.total.remote(), timeout=30) == 4 * MB // 8
    strato.kill(b)
    del b
    wait_empty(_local_dirs(), "an object held by a killed actor to be freed")
    strato.kill(a)


def test_an_object_whose_owner_exited_raises_owner_died(local):
    """As in Ray, an object goes with its driver. A detached actor that kept a ref of a
    driver that exited gets OwnerDiedError, naming why, not "unknown". (A worker's
    objects outlive it while a borrower holds them: the agent keeps them.)"""
    import subprocess
    import sys

    from strato.exceptions import OwnerDiedError
    from strato.runtime import api

    strato = local

    @strato.remote
    class Keeper:
        def __init__(self):
            self.refs = []

        def keep(self, refs):
            self.refs = refs

        def first(self):
            return int(strato.get(self.refs[0], timeout=30)[0])

    keeper = Keeper.options(name="owner-died-keeper", lifetime="detached").remote()
    strato.get(keeper.keep.remote([]), timeout=30)
    other_driver = f"""
import numpy as np, strato
strato.init(address="auto", temp_dir={api._state["temp_dir"]!r})
k = strato.get_actor("owner-died-keeper")
strato.get(k.keep.remote([strato.put(np.full({MB // 8}, 9, dtype=np.int64))]), timeout=30)
assert strato.get(k.first.remote(), timeout=30) == 9
strato.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", other_driver], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    try:
        with pytest.raises(OwnerDiedError, match="process that owned it .* exited"):
            strato.get(keeper.first.remote(), timeout=30)
    finally:
        strato.kill(keeper)


def test_d_inside_a_put_object(local):
    strato = local
    inner = strato.put(big(5))
    middle = strato.put({"inner": inner, "own": big(6)})
    outer = strato.put([middle])
    del inner, middle
    gc.collect()
    time.sleep(0.3)           # outer holds middle, which holds inner
    got_middle = strato.get(outer)[0]
    got_inner = strato.get(got_middle)["inner"]
    assert int(strato.get(got_inner)[0]) == 5
    del outer, got_middle     # what was rebuilt from them is still held: stays
    wait_until(lambda: gc.collect() is not None and len(_files(_local_dirs())) == 1,
               EMPTY_WITHIN_S, 0.1, "the middle object to be freed, the inner one kept")
    assert int(strato.get(got_inner)[0]) == 5
    del got_inner
    wait_empty(_local_dirs(), "objects inside put objects to be freed")

    # a long chain: freeing the head frees every link (no recursion limit)
    ref = strato.put(big(7))
    for _ in range(2000):
        ref = strato.put([ref])
    del ref
    wait_empty(_local_dirs(), "a chain of 2000 nested puts to be freed")


def test_a_ref_kept_from_a_second_read_of_a_value(local):
    """The refs in a value are noted once, at its first read; one kept from a later read
    is still registered when the value's ref goes."""
    strato = local
    inner = strato.put(big(17))
    outer = strato.put([inner])
    del inner
    first = strato.get(outer)
    del first
    gc.collect()
    kept = strato.get(outer)[0]
    del outer
    gc.collect()
    time.sleep(0.3)
    assert int(strato.get(kept, timeout=30)[0]) == 17
    del kept
    wait_empty(_local_dirs(), "an object kept from a second read to be freed")


def test_the_runtimes_own_uncounted_read_leaves_a_users_ref_alone(local):
    """The runtime reads a working dir's package through an uncounted ref; its end must
    not take the count of a user's ref to the same object (the object stays readable,
    then goes with the user's ref)."""
    from strato.runtime.core import UncountedRef, current

    strato = local
    ref = strato.put(big(23))
    inner = UncountedRef(ref.id, ref.owner_node)
    assert int(strato.get(inner, timeout=30)[0]) == 23
    del inner
    gc.collect()
    assert current().refcounts[ref.id] == 1
    assert int(strato.get(ref, timeout=30)[0]) == 23
    del ref
    wait_empty(_local_dirs(), "the object to be freed with the user's ref")


def test_f_borrower_worker_killed(local):
    strato = local

    @strato.remote
    def stash(refs):
        global _stashed
        _stashed = refs       # the worker process keeps it past the task
        return os.getpid()

    @strato.remote
    def reads(refs):
        return int(strato.get(refs[0])[0])

    r = strato.put(big(8))
    pid = strato.get(stash.remote([r]), timeout=30)
    del r
    gc.collect()
    time.sleep(0.5)
    assert len(_files(_local_dirs())) == 1     # the worker's borrow keeps it
    os.kill(pid, signal.SIGKILL)
    wait_empty(_local_dirs(), "an object whose only borrower was killed to be freed")
    assert strato.get(reads.remote([strato.put(big(9))]), timeout=30) == 9   # the node goes on


def test_refs_put_by_a_failed_attempt_do_not_leak(local):
    strato = local

    @strato.remote(max_retries=2, retry_exceptions=True)
    def flaky(path):
        r = strato.put(big(10))
        if not os.path.exists(path):
            open(path, "w").close()
            raise ValueError("first attempt fails")
        return [r]

    import tempfile

    gate = os.path.join(tempfile.mkdtemp(), "once")
    out = strato.get(flaky.remote(gate), timeout=30)
    assert int(strato.get(out[0])[0]) == 10
    del out
    wait_empty(_local_dirs(), "the results of a retried task to be freed")


class CarriesRef(Exception):
    def __init__(self, ref):
        super().__init__("carries a ref")
        self.ref = ref

    def __reduce__(self):
        return (CarriesRef, (self.ref,))


def test_refs_inside_a_raised_exception(local):
    strato = local

    @strato.remote
    def fails():
        raise CarriesRef(strato.put(big(16)))

    with pytest.raises(CarriesRef) as info:
        strato.get(fails.remote(), timeout=30)
    ref = info.value.cause.ref   # (the TaskError carries the raised exception)
    del info
    gc.collect()
    time.sleep(0.3)
    assert int(strato.get(ref, timeout=30)[0]) == 16
    del ref
    wait_empty(_local_dirs(), "an object carried by an exception to be freed")


# ------------------------------------------------------------------ across nodes
def _all_dirs(cluster) -> list[str]:
    return [d for ds in _node_dirs(cluster).values() for d in ds]


@pytest.fixture
def nodes(multinode):
    wait_empty(_all_dirs(multinode), "empty stores before the test")
    return multinode


def test_e_borrowers_on_other_nodes(nodes):
    import strato

    @strato.remote(resources={"node_b": 0.5}, num_cpus=0)
    class HolderB:
        def hold(self, refs):
            self.refs = refs

        def total(self):
            return int(strato.get(self.refs[0]).sum())

        def drop(self):
            self.refs = None

    @strato.remote(resources={"node_c": 1})
    def make_on_c():
        return [strato.put(big(11))]

    @strato.remote(resources={"node_b": 0.5})
    def relay_on_b(refs):
        return {"again": refs}

    # (a, e) the driver's object, borrowed by an actor on B; a copy is pulled there
    h = HolderB.remote()
    r = strato.put(big(12))
    strato.get(h.hold.remote([r]), timeout=30)
    del r
    gc.collect()
    time.sleep(0.5)
    assert strato.get(h.total.remote(), timeout=30) == 12 * MB // 8
    strato.get(h.drop.remote(), timeout=30)
    wait_empty(_all_dirs(nodes), "an object borrowed on B (and its copy there) to be freed")

    # (b, e) a worker on C owns the object; the driver on A borrows it, passes it
    # through a task on B and keeps only what came back
    out = strato.get(make_on_c.remote(), timeout=30)
    back = strato.get(relay_on_b.remote(out), timeout=30)["again"][0]
    del out
    gc.collect()
    time.sleep(0.5)
    assert int(strato.get(back, timeout=30)[0]) == 11
    del back
    wait_empty(_all_dirs(nodes), "an object owned on C, borrowed via B and A, to be freed")

    # (d, e) an object inside a put, read on B after the driver dropped the inner ref
    inner = strato.put(big(13))
    outer = strato.put([inner])
    del inner
    gc.collect()

    @strato.remote(resources={"node_b": 0.5})
    def read_inner(wrapped):
        return int(strato.get(strato.get(wrapped[0])[0])[0])

    assert strato.get(read_inner.remote([outer]), timeout=30) == 13
    del outer
    wait_empty(_all_dirs(nodes), "objects inside a put read on another node to be freed")
    strato.kill(h)


def test_f_borrower_actor_on_another_node_killed(nodes):
    import strato

    @strato.remote(resources={"node_c": 1}, num_cpus=0)
    class HolderC:
        def __init__(self, refs):
            self.refs = refs

        def first(self):
            return int(strato.get(self.refs[0])[0])

    r = strato.put(big(14))
    a = HolderC.remote([r])
    assert strato.get(a.first.remote(), timeout=30) == 14
    del r
    gc.collect()
    time.sleep(0.5)
    assert strato.get(a.first.remote(), timeout=30) == 14   # C's borrow keeps it
    strato.kill(a)
    del a
    wait_empty(_all_dirs(nodes), "an object borrowed by a killed actor on C to be freed")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_passing_across_nodes(nodes, seed):
    """150 random steps: puts, results made on any node, refs relayed through tasks,
    kept, read and dropped by actors on A, B and C, actors killed and replaced, the
    driver dropping refs. Every value the driver holds stays readable throughout; at the
    end every store is empty."""
    import random

    import strato

    rng = random.Random(seed)

    def val(v: int) -> np.ndarray:
        return np.full(MB // 16, v, dtype=np.int64)

    @strato.remote(num_cpus=0)
    class Keeper:
        def __init__(self):
            self.kept = []

        def keep(self, refs):
            self.kept.extend(refs)

        def check(self):
            return [int(strato.get(r)[0]) for r in self.kept]

        def drop_some(self, k):
            random.shuffle(self.kept)
            del self.kept[:k]

        def give(self, k):
            return [self.kept[:k]]

        def make(self, v):
            return [strato.put(val(v))]

    @strato.remote
    def relay(refs):
        return [refs[: max(1, len(refs) // 2)]]

    @strato.remote
    def make(v):
        return {"r": strato.put(val(v))}

    @strato.remote
    def read(refs):
        return [int(strato.get(r)[0]) for r in refs]

    where = [{}, {"resources": {"node_b": 0.01}}, {"resources": {"node_c": 0.01}}]
    keepers = [Keeper.options(**w).remote() for w in where]
    held: dict = {}   # ref -> the value it holds
    for step in range(150):
        op = rng.randrange(9)
        if op == 0 or not held:
            v = rng.randrange(1000)
            held[strato.put(val(v))] = v
        elif op == 1:
            v = rng.randrange(1000)
            held[strato.get(make.options(**rng.choice(where)).remote(v), timeout=30)["r"]] = v
        elif op == 2:
            refs = rng.sample(list(held), min(len(held), 3))
            back = strato.get(relay.options(**rng.choice(where)).remote(refs), timeout=30)[0]
            assert all(r in held for r in back)
        elif op == 3:
            refs = rng.sample(list(held), min(len(held), 2))
            strato.get(rng.choice(keepers).keep.remote(refs), timeout=30)
        elif op == 4:
            k = rng.choice(keepers)
            strato.get(k.check.remote(), timeout=30)
            strato.get(k.drop_some.remote(rng.randrange(3)), timeout=30)
        elif op == 5 and len(held) > 2:
            for r in rng.sample(list(held), rng.randrange(1, 3)):
                del held[r]
        elif op == 6:
            refs = rng.sample(list(held), min(len(held), 4))
            assert strato.get(read.options(**rng.choice(where)).remote(refs),
                              timeout=30) == [held[r] for r in refs]
        elif op == 7:
            k = rng.choice(keepers)
            v = rng.randrange(1000)
            held[strato.get(k.make.remote(v), timeout=30)[0]] = v
            for given in strato.get(k.give.remote(2), timeout=30)[0]:
                strato.get(given, timeout=30)
        elif op == 8:
            i = rng.randrange(3)
            strato.kill(keepers[i])
            keepers[i] = Keeper.options(**where[i]).remote()
        if step % 25 == 0:
            for r, v in held.items():
                assert int(strato.get(r, timeout=30)[0]) == v
    for k in keepers:
        strato.get(k.check.remote(), timeout=30)
        strato.kill(k)
    for r, v in held.items():
        assert int(strato.get(r, timeout=30)[0]) == v
    del keepers, k, r, refs, back, given
    held.clear()
    wait_empty(_all_dirs(nodes), "every object of the random run to be freed")


# ------------------------------------------------------------------ last: kills a node
def test_borrower_node_dies(multinode_fn):
    import strato

    cluster = multinode_fn
    dirs_a = _node_dirs(cluster)["A"]

    @strato.remote(resources={"node_b": 1})
    def stash(refs):
        global _stashed
        _stashed = refs
        return int(strato.get(refs[0])[0])

    r = strato.put(big(15))
    assert strato.get(stash.remote([r]), timeout=30) == 15
    del r
    gc.collect()
    time.sleep(0.5)
    assert len(_files(dirs_a)) == 1         # B's borrow keeps the driver's object
    cluster.kill_node("B")
    cluster.wait_node_dead("B")
    wait_empty(dirs_a, "an object whose only borrower node died to be freed")
