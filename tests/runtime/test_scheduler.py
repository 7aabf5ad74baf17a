"""Placement policy as a pure function: strato.runtime.scheduler.place / fits."""

from strato.runtime.scheduler import (
    INFEASIBLE,
    LOCAL,
    REMOTE,
    WAIT,
    NodeView,
    acquire,
    fits,
    place,
)


def node(name: str, total: dict, available: dict | None = None, **kw) -> NodeView:
    return NodeView(name.encode(), total, dict(total if available is None else available), **kw)


# ------------------------------------------------------------------ fits
def test_fits_empty_shape_fits_anything():
    assert fits({}, {})
    assert fits({}, {"CPU": 0})


def test_fits_exact_and_over():
    assert fits({"CPU": 2}, {"CPU": 2})
    assert not fits({"CPU": 2.5}, {"CPU": 2})
    assert fits({"CPU": 0.5, "GPU": 1}, {"CPU": 1, "GPU": 1})
    assert not fits({"CPU": 0.5, "GPU": 1}, {"CPU": 1})


def test_fits_missing_custom_resource():
    assert not fits({"tpu": 1}, {"CPU": 8})
    assert fits({"tpu": 1}, {"CPU": 8, "tpu": 4})


def test_fits_zero_amount_needs_nothing():
    assert fits({"CPU": 0, "tpu": 0}, {})


def test_fits_tolerates_float_rounding():
    # ten tasks of 0.1 CPU acquired: 1.0 - 10 * 0.1 is not exactly 0 in floating point
    available = {"CPU": 1.0}
    for _ in range(9):
        acquire(available, {"CPU": 0.1})
    assert fits({"CPU": 0.1}, available)


# ------------------------------------------------------------------ place
def test_place_local_when_it_fits():
    local = node("a", {"CPU": 2})
    assert place({"CPU": 1}, local, [local, node("b", {"CPU": 8})]) == (LOCAL, b"a")


def test_place_spills_to_remote_that_has_the_resource():
    local = node("a", {"CPU": 2})
    b = node("b", {"CPU": 1, "node_b": 1})
    c = node("c", {"CPU": 1, "node_c": 1})
    assert place({"CPU": 1, "node_b": 1}, local, [local, b, c]) == (REMOTE, b"b")
    assert place({"node_c": 1}, local, [local, b, c]) == (REMOTE, b"c")


def test_place_spills_when_local_is_busy():
    local = node("a", {"CPU": 1}, {"CPU": 0})
    b = node("b", {"CPU": 1})
    assert place({"CPU": 1}, local, [local, b]) == (REMOTE, b"b")


def test_place_prefers_remote_with_most_headroom():
    local = node("a", {"CPU": 1}, {"CPU": 0})
    small = node("b", {"CPU": 4}, {"CPU": 1})
    big = node("c", {"CPU": 4}, {"CPU": 3})
    assert place({"CPU": 1}, local, [local, small, big]) == (REMOTE, b"c")


def test_place_waits_when_busy_everywhere_but_feasible():
    local = node("a", {"CPU": 1}, {"CPU": 0})
    b = node("b", {"CPU": 1}, {"CPU": 0})
    assert place({"CPU": 1}, local, [local, b]) == (WAIT, None)


def test_place_waits_when_only_local_could_ever_fit():
    local = node("a", {"GPU": 1}, {"GPU": 0})
    assert place({"GPU": 1}, local, [node("b", {"CPU": 8})]) == (WAIT, None)


def test_place_infeasible_when_no_node_could_ever_fit():
    local = node("a", {"CPU": 2})
    assert place({"CPU": 3}, local, [local, node("b", {"CPU": 2})]) == (INFEASIBLE, None)
    assert place({"tpu": 1}, local, [local]) == (INFEASIBLE, None)


def test_place_skips_dead_and_draining_nodes():
    local = node("a", {"CPU": 1}, {"CPU": 0})
    dead = node("b", {"CPU": 4, "x": 1}, alive=False)
    draining = node("c", {"CPU": 4, "x": 1}, draining=True)
    assert place({"x": 1}, local, [local, dead, draining]) == (INFEASIBLE, None)
    assert place({"CPU": 1}, local, [local, dead, draining]) == (WAIT, None)


def test_place_draining_local_spills():
    local = node("a", {"CPU": 4}, draining=True)
    b = node("b", {"CPU": 1})
    assert place({"CPU": 1}, local, [local, b]) == (REMOTE, b"b")


def test_place_without_local_node():
    b = node("b", {"CPU": 1})
    assert place({"CPU": 1}, None, [b]) == (REMOTE, b"b")
    assert place({"CPU": 2}, None, [b]) == (INFEASIBLE, None)


def test_place_never_returns_local_as_remote():
    local = node("a", {"CPU": 1}, {"CPU": 0})
    # the local node's stale entry in the cluster view says it has room: still not REMOTE to itself
    stale = node("a", {"CPU": 1})
    assert place({"CPU": 1}, local, [stale]) == (WAIT, None)


def test_place_is_pure():
    local = node("a", {"CPU": 1})
    nodes = [local, node("b", {"CPU": 2})]
    before = [dict(n.available) for n in nodes]
    place({"CPU": 1}, local, nodes)
    place({"CPU": 5}, local, nodes)
    assert [dict(n.available) for n in nodes] == before
