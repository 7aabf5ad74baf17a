"""The object store stays flat under a tight put/get loop."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(60)


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
