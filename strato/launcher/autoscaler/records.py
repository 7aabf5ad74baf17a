"""The records `plan()` reads and returns: plain frozen data, no behaviour.

`Snapshot` is everything the decision sees (config as `NodeTypeInfo`, nodes as
`NodeInfo`, `Demand` and `GangDemand`, capacity `TypeBackoff`s, the time); `Plan` is what
it decides (`Launch`, `Terminate`, `Drain`, `RetrySetup`, warnings). They live apart from
the rules because the loop, pricing and reconcile build and read them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from strato.catalog import LaunchOption
from strato.launcher.autoscaler.lifecycle import NodeState
from strato.launcher.autoscaler.shapes import Resources

HEAD = "head"
WORKER = "worker"
GPU_COST_WEIGHT = 20.0

# --- inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeTypeInfo:
    """One entry of `available_node_types`, as far as the decision needs it."""

    name: str
    resources: Resources
    min_workers: int = 0
    max_workers: int | None = None  # None: only the global max_workers bounds it
    spot: bool = False
    fallback_to_on_demand: bool = False
    zones: tuple[str, ...] = ()
    cost_rank: float | None = None  # lower = cheaper; None -> CPU + 20 * GPU
    # USD per hour of the way it launches first (spot or not); None: unknown
    price_per_hour: float | None = None
    # where and as what to launch, in order (types named by GPU); () -> zones x spot
    options: tuple[LaunchOption, ...] = ()

    def __post_init__(self) -> None:
        if self.cost_rank is None:
            derived = self.resources.get("CPU", 0.0) + GPU_COST_WEIGHT * self.resources.get(
                "GPU", 0.0
            )
            object.__setattr__(self, "cost_rank", float(derived))

    @property
    def has_gpu(self) -> bool:
        return self.resources.get("GPU", 0.0) > 0


@dataclass(frozen=True)
class NodeInfo:
    """One node as the instance manager and the head see it now."""

    id: str
    node_type: str
    kind: str = WORKER  # "head" or "worker"
    state: NodeState = NodeState.RUNNING
    launch_hash_current: bool = True
    idle_since: float | None = None  # None = busy
    available: Resources | None = None  # free resources; None = the type's full resources
    spot: bool = False
    preempted: bool = False
    draining: bool = False
    holds_primary_objects: bool = False
    has_actors: bool = False
    setup_failures: int = 0
    setup_retry_at: float | None = None  # SETUP_FAILED: earliest retry time (None = now)


@dataclass(frozen=True)
class Demand:
    """`count` pending requests of one resource shape (tasks, actors, placement bundles)."""

    shape: Resources
    count: int = 1
    infeasible_on_current_nodes: bool = False


@dataclass(frozen=True)
class GangDemand:
    """A pending placement group: its `bundles` need room together, per `strategy`
    (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)."""

    bundles: tuple[Resources, ...]
    strategy: str = "PACK"


def demand_from_head(entries: Iterable[Mapping]) -> tuple[list[Demand], list[GangDemand]]:
    """`HeadClient.demand()` entries as Demand (shapes) and GangDemand (entries with
    `bundles`: pending placement groups)."""
    shapes: list[Demand] = []
    gangs: list[GangDemand] = []
    for d in entries:
        if d.get("bundles"):
            gangs.append(GangDemand(tuple(dict(b) for b in d["bundles"]),
                                    str(d.get("strategy") or "PACK")))
        else:
            shapes.append(Demand(dict(d.get("shape") or {}), int(d.get("count") or 0),
                                 bool(d.get("infeasible"))))
    return shapes, gangs


@dataclass(frozen=True)
class TypeBackoff:
    """No launches of `node_type` (in `zone`, or any zone if None, as spot or not) until `until`."""

    node_type: str
    zone: str | None
    spot: bool
    until: float
    failures: int = 1
    instance_type: str | None = None  # None: every instance type of the node type


@dataclass(frozen=True)
class Snapshot:
    """Everything the decision reads: config, nodes, demand, backoffs, and the time."""

    now: float
    node_types: Mapping[str, NodeTypeInfo]
    nodes: Sequence[NodeInfo] = ()
    demand: Sequence[Demand] = ()
    max_workers: int | None = None  # global cap on workers (head excluded); None = none
    upscaling_speed: float = 1.0
    idle_timeout_s: float = 300.0
    backoffs: Sequence[TypeBackoff] = ()
    max_setup_failures: int = 3
    gangs: Sequence[GangDemand] = ()  # pending placement groups


# --- outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    node_type: str
    count: int
    reason: str
    spot: bool = False
    instance_type: str | None = None  # the option chosen (types named by GPU)


@dataclass(frozen=True)
class Terminate:
    node_id: str
    reason: str


@dataclass(frozen=True)
class Drain:
    node_id: str
    reason: str


@dataclass(frozen=True)
class RetrySetup:
    node_id: str
    reason: str


@dataclass
class Plan:
    """What to do this tick; empty lists mean nothing to do."""

    launch: list[Launch] = field(default_factory=list)
    terminate: list[Terminate] = field(default_factory=list)
    drain: list[Drain] = field(default_factory=list)
    retry_setup: list[RetrySetup] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return not (self.launch or self.terminate or self.drain or self.retry_setup)

    def describe(self) -> list[str]:
        """One line per action and warning, for logs and `strato status` events."""
        lines = [
            f"launch {a.count} x {a.node_type} ({'spot' if a.spot else 'on-demand'}): {a.reason}"
            for a in self.launch
        ]
        lines += [f"terminate {a.node_id}: {a.reason}" for a in self.terminate]
        lines += [f"drain {a.node_id}: {a.reason}" for a in self.drain]
        lines += [f"retry setup {a.node_id}: {a.reason}" for a in self.retry_setup]
        lines += [f"warning: {w}" for w in self.warnings]
        return lines
