"""Every object counts against the store: task results like puts, spill has a cap, and a
node at startup removes store dirs that dead nodes left in /dev/shm."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024


def _dir_bytes(path: str) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    total += e.stat().st_size
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        pass
    return total


def test_task_results_are_capped_and_spilled_like_puts(strato_local_fn):
    strato = strato_local_fn(num_cpus=2, object_store_memory=40 * MB)
    from strato.runtime.core import current

    shm_dir, spill_dir = current().store_paths

    @strato.remote
    def make(i):
        return np.full(10 * MB // 8, i, dtype=np.int64)   # 10 MB each, stored, not inline

    refs = [make.remote(i) for i in range(12)]            # 120 MB of results
    strato.wait(refs, num_returns=len(refs), timeout=60)
    wait_until(lambda: _dir_bytes(shm_dir) <= 40 * MB, 10, 0.05,
               f"results in {shm_dir} to fit the 40 MB store (spilling the rest)")
    assert _dir_bytes(spill_dir) >= 70 * MB
    node = strato.nodes()[0]
    assert node["ObjectStoreUsed"] <= 40 * MB
    for i, ref in enumerate(refs):   # spilled results read back correctly
        value = strato.get(ref, timeout=30)
        assert value[0] == i and value[-1] == i
    del value
    # a freed result's file goes too (it leaked in /dev/shm before)
    del refs, ref
    current().flush_frees()   # frees leave in batches, with the next message
    wait_until(lambda: _dir_bytes(shm_dir) == 0 and _dir_bytes(spill_dir) == 0, 20, 0.1,
               "freed results to leave the store and the spill dir")


def test_spill_cap_gives_a_clear_error_when_both_are_full(strato_local_fn, monkeypatch):
    monkeypatch.setenv("STRATO_OBJECT_SPILL_LIMIT", str(25 * MB))
    strato = strato_local_fn(num_cpus=1, object_store_memory=25 * MB)
    from strato.exceptions import ObjectStoreFullError
    from strato.runtime.core import current

    shm_dir, spill_dir = current().store_paths

    @strato.remote
    def make(i):
        return np.full(10 * MB // 8, i, dtype=np.int64)

    refs = [make.remote(i) for i in range(8)]              # 80 MB > 25 + 25
    puts = [strato.put(np.zeros(10 * MB // 8)) for _ in range(2)]
    errors = []
    for ref in refs + puts:
        try:
            strato.get(ref, timeout=60)
        except ObjectStoreFullError as exc:
            errors.append(str(exc))
    assert errors, "nothing failed although memory and spill were both full"
    assert "spill" in errors[0] and "object_store_memory" in errors[0]
    assert _dir_bytes(shm_dir) <= 25 * MB + 10 * MB and _dir_bytes(spill_dir) <= 25 * MB


def test_a_starting_node_removes_store_dirs_of_dead_nodes(strato_local_fn):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"/dev/shm/strato-{dead.pid}-deadbeef"
    live = f"/dev/shm/strato-{os.getpid()}-livelive"   # this process is alive: kept
    foreign = tempfile.mkdtemp(prefix="strato-x-", dir="/dev/shm")  # not a store dir name
    try:
        for d in (stale, live):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "obj"), "wb") as f:
                f.write(b"x" * 1024)
        strato_local_fn(num_cpus=1)
        assert not os.path.exists(stale)
        assert os.path.exists(live) and os.path.exists(foreign)
    finally:
        for d in [live, foreign, *glob.glob(stale)]:
            shutil.rmtree(d, ignore_errors=True)
