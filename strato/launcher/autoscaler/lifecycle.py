"""Node lifecycle states for the autoscaler's instance manager, with one transition table.

The autoscaler loop keeps one record per machine in one of these states and changes it
only through `check_transition`, so the allowed moves are written down here and nowhere
else.
"""

from __future__ import annotations

from enum import Enum


class NodeState(str, Enum):
    """Where one node is in its life, from the autoscaler's point of view."""

    QUEUED = "queued"  # decided by a plan, not yet asked of the provider
    REQUESTED = "requested"  # create_nodes called, instance not confirmed yet
    ALLOCATED = "allocated"  # the provider has an instance for it
    SETTING_UP = "setting_up"  # bootstrap / setup commands running
    RUNNING = "running"  # registered with the head, takes work
    SETUP_FAILED = "setup_failed"  # setup exited non-zero; retried or terminated
    DRAINING = "draining"  # takes no new work (preemption notice, scale-down)
    TERMINATING = "terminating"  # terminate_nodes called
    TERMINATED = "terminated"  # gone (by us, by the cloud, or lost)


State = NodeState

_S = NodeState

ALLOWED: dict[NodeState, frozenset[NodeState]] = {
    # A queued launch may be dropped before it reaches the provider.
    _S.QUEUED: frozenset({_S.REQUESTED, _S.TERMINATED}),
    # A capacity error sends the request back to the queue for the next zone / on-demand.
    _S.REQUESTED: frozenset({_S.ALLOCATED, _S.QUEUED, _S.TERMINATED}),
    _S.ALLOCATED: frozenset({_S.SETTING_UP, _S.TERMINATING, _S.TERMINATED}),
    _S.SETTING_UP: frozenset({_S.RUNNING, _S.SETUP_FAILED, _S.TERMINATING, _S.TERMINATED}),
    # Retry setup (up to the limit), or give the node up.
    _S.SETUP_FAILED: frozenset({_S.SETTING_UP, _S.TERMINATING, _S.TERMINATED}),
    # A host the autoscaler may not replace (SSH) gets its dead runtime restarted in place.
    _S.RUNNING: frozenset({_S.DRAINING, _S.SETTING_UP, _S.TERMINATING, _S.TERMINATED}),
    # A drain can be cancelled (e.g. the scale-down is no longer wanted).
    _S.DRAINING: frozenset({_S.RUNNING, _S.SETTING_UP, _S.TERMINATING, _S.TERMINATED}),
    _S.TERMINATING: frozenset({_S.TERMINATED}),
    _S.TERMINATED: frozenset(),
}

# Launched but not yet registered: counts as capacity on the way, never as idle.
PENDING: frozenset[NodeState] = frozenset({_S.QUEUED, _S.REQUESTED, _S.ALLOCATED, _S.SETTING_UP})
# Leaving or gone: counts for nothing.
GONE: frozenset[NodeState] = frozenset({_S.TERMINATING, _S.TERMINATED})


def check_transition(old: NodeState, new: NodeState) -> None:
    """Raise ValueError, naming both states, unless `old -> new` is in ALLOWED."""
    if new not in ALLOWED[old]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[old])) or "nothing (final)"
        raise ValueError(
            f"illegal node state transition {old.value} -> {new.value} "
            f"(from {old.value} allowed: {allowed})"
        )
