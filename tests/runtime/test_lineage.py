"""Lineage kept for rebuilds, bounded: an object nobody holds any more loses its value at
once, but its lineage stays while a live object's task took it as an argument (so a lost
result can be rebuilt by re-running the chain; see test_multinode), at most
STRATO_LINEAGE_KEPT such objects per node, the oldest going first."""

from __future__ import annotations

import gc

import pytest

from tests.harness.runtime_cluster import wait_until

pytestmark = pytest.mark.timeout(120)


def _owned() -> int:
    from strato.runtime.core import current

    return current().rpc("debug_state")["objects"]


def test_a_long_chain_keeps_a_bounded_lineage(strato_local_fn, monkeypatch):
    monkeypatch.setenv("STRATO_LINEAGE_KEPT", "50")
    strato = strato_local_fn(num_cpus=2)

    @strato.remote
    def inc(x):
        return x + 1

    ref = inc.remote(0)
    for _ in range(299):
        ref = inc.remote(ref)          # each call's argument is dropped as it is made
    assert strato.get(ref, timeout=60) == 300
    # the live result and at most 50 freed objects' lineage: not the whole chain
    wait_until(lambda: _owned() <= 51, 20, 0.05, "the kept lineage to stay within 50")
    assert _owned() >= 2              # (some is kept: the chain behind the live result)
    del ref
    gc.collect()
    wait_until(lambda: _owned() == 0, 20, 0.05, "the owner's table to empty")


def test_lineage_of_a_put_is_never_kept(strato_local):
    """A put cannot be re-run: an argument made by put is freed whole when dropped."""
    strato = strato_local

    @strato.remote
    def length(x):
        return len(x)

    before = _owned()
    ref = length.remote(strato.put(b"x" * 200_000))
    assert strato.get(ref, timeout=30) == 200_000
    wait_until(lambda: _owned() == before + 1, 20, 0.05, "only the result to be left")
    del ref
    gc.collect()
    wait_until(lambda: _owned() == before, 20, 0.05, "the owner's table to empty")
