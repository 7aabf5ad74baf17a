"""The loop's record of each machine, and the only place that record changes state.

Each machine's lifecycle lives in one stored ``Instance`` (state, since, setup failures,
next retry), changed only by events as they happen, each transition checked against
``lifecycle.ALLOWED``: launch requested (QUEUED -> REQUESTED, back to QUEUED on a
capacity error), provider reported it (ALLOCATED), bootstrap started / finished / failed
(SETTING_UP, RUNNING, SETUP_FAILED), the head reports it draining (DRAINING), terminate
requested (TERMINATING), gone from the provider (TERMINATED). Machines the loop did not
launch (the head, workers set up by ``up``, a restarted monitor) are adopted once from
their status tag. A tick reads records; it never re-derives them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from strato.launcher.autoscaler.lifecycle import NodeState, check_transition
from strato.providers.base import TAG_STATUS, Node, NodeStatus
from strato.providers.base import NodeState as MachineState

__all__ = ["Instance", "Instances", "setup_retry_delay"]

SETUP_RETRY_BASE_S = 10.0
SETUP_RETRY_CAP_S = 300.0


def setup_retry_delay(failures: int) -> float:
    """Wait before the next setup attempt after ``failures`` failed ones: 10 s, x2, <= 5 min."""
    return min(SETUP_RETRY_BASE_S * 2 ** max(failures - 1, 0), SETUP_RETRY_CAP_S)


@dataclass
class Instance:
    """The loop's record of one machine: the truth about where it is in its life."""

    state: NodeState
    since: float                      # when it entered ``state``
    node_type: str = ""
    failures: int = 0                 # setup attempts failed in a row
    retry_at: float | None = None     # when a failed setup may be tried again
    missing_since: float | None = None  # set up, but not (or no longer) alive at the head
    preempted: bool = False           # the cloud took (or is taking) it back


class Instances(dict[str, Instance]):
    """Records by provider node id (TERMINATED ones kept); states change only through
    ``move`` and ``set_state``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock

    def for_node(self, node: Node) -> Instance:
        """The machine's record; one it has no record of is adopted from its status tag
        (RUNNING if set up, SETUP_FAILED if its setup failed, else ALLOCATED: to set up)."""
        rec = self.get(node.id)
        gone = node.state == MachineState.TERMINATED
        if rec is not None and (gone or rec.state != NodeState.TERMINATED):
            return rec
        # unknown, or a new life under an old id (an SSH host claimed again)
        status = node.tags.get(TAG_STATUS)
        if gone:
            state = NodeState.TERMINATED
        elif status == NodeStatus.UP_TO_DATE.value:
            state = NodeState.RUNNING
        elif status == NodeStatus.UPDATE_FAILED.value:
            state = NodeState.SETUP_FAILED
        else:
            state = NodeState.ALLOCATED
        rec = Instance(state, since=self.clock(), node_type=node.node_type or "",
                       failures=1 if state == NodeState.SETUP_FAILED else 0)
        self[node.id] = rec
        return rec

    def move(self, node_id: str, new: NodeState) -> None:
        """Event: the machine's record enters ``new`` (checked against ALLOWED)."""
        self.set_state(self[node_id], new)

    def set_state(self, rec: Instance, new: NodeState) -> None:
        """``move`` for a record not (yet) stored: a launch still queued."""
        if rec.state == new:
            return
        check_transition(rec.state, new)
        rec.state, rec.since = new, self.clock()
        if new == NodeState.TERMINATED:
            rec.missing_since = None

    def gone_unlisted(self, listed: set[str]) -> None:
        """Event: machines asked to terminate that the provider no longer lists are gone."""
        for node_id, rec in self.items():
            if rec.state == NodeState.TERMINATING and node_id not in listed:
                self.move(node_id, NodeState.TERMINATED)
