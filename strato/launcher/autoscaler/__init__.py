"""Autoscaler: a pure decision (`plan`) over a snapshot, and the node lifecycle it drives.

`plan(Snapshot) -> Plan` decides; the loop that reads the head and providers and applies
the plan lives beside it and stays thin. See `plan.py` for the rules and where each
lives.
"""

from strato.launcher.autoscaler.lifecycle import ALLOWED, NodeState, check_transition
from strato.launcher.autoscaler.options import (
    clear_backoff,
    next_option,
    next_zone,
    record_capacity_failure,
)
from strato.launcher.autoscaler.plan import plan
from strato.launcher.autoscaler.records import (
    Demand,
    Drain,
    GangDemand,
    Launch,
    NodeInfo,
    NodeTypeInfo,
    Plan,
    RetrySetup,
    Snapshot,
    Terminate,
    TypeBackoff,
    demand_from_head,
)

__all__ = [
    "ALLOWED",
    "Demand",
    "Drain",
    "GangDemand",
    "Launch",
    "NodeInfo",
    "NodeState",
    "NodeTypeInfo",
    "Plan",
    "RetrySetup",
    "Snapshot",
    "Terminate",
    "TypeBackoff",
    "check_transition",
    "clear_backoff",
    "demand_from_head",
    "next_option",
    "next_zone",
    "plan",
    "record_capacity_failure",
]
