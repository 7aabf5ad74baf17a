"""wait(): which refs come back ready, in the caller's order, fast when they are ready."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


def test_wait_on_ready_refs_splits_in_order(strato_local):
    strato = strato_local
    refs = [strato.put(i) for i in range(10)]
    done, rest = strato.wait(refs, num_returns=10)
    assert done == refs and rest == []
    done, rest = strato.wait(refs, num_returns=3, timeout=0)
    assert done == refs[:3] and rest == refs[3:]


def test_wait_mixes_ready_and_pending_refs(strato_local, tmp_path):
    strato = strato_local

    @strato.remote
    def slow(gate):
        import os
        import time
        for _ in range(600):
            if os.path.exists(gate):
                return "late"
            time.sleep(0.05)
        return "timeout"

    gate = str(tmp_path / "gate")
    pending = slow.remote(gate)
    ready = [strato.put(i) for i in range(3)]
    refs = [ready[0], pending, ready[1], ready[2]]
    done, rest = strato.wait(refs, num_returns=2, timeout=0)
    assert done == [ready[0], ready[1]] and rest == [pending, ready[2]]
    done, rest = strato.wait(refs, num_returns=4, timeout=0.2)
    assert done == ready and rest == [pending]
    open(gate, "w").close()
    done, rest = strato.wait(refs, num_returns=4, timeout=30)
    assert done == refs and rest == []
    assert strato.get(pending) == "late"
