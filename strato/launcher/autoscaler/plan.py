"""The autoscaler's decision as a pure function: `plan(snapshot) -> Plan`.

No I/O and no clocks (`Snapshot.now` is the time), so every rule is unit-tested with
plain data; the loop that reads the cluster and applies the plan is separate and thin.
Every action carries a human-readable reason that `strato status` shows.

Rules, in the order `plan` applies them:

1. Accounting. The head is never terminated or drained; its free resources are capacity.
   Workers TERMINATING/TERMINATED count for nothing. A preempted worker is dropped from
   accounting (so it gets replaced) and is drained, or terminated if idle with nothing to
   save. SETUP_FAILED below `max_setup_failures` -> `retry_setup` (counts as pending);
   at the limit -> terminate (and replaced by rules 2-3). Workers with an outdated launch
   hash (or a type no longer in the config) count toward `max_workers` but neither as
   capacity nor toward `min_workers`, so their replacements are launched; not-yet-running
   ones are terminated at once, running ones when idle.
2. `min_workers`: launch up to the minimum per type, reason "min_workers".
3. Demand: first-fit decreasing onto free resources of registered nodes (skipped for
   demand flagged `infeasible_on_current_nodes`), then pending nodes, then nodes launched
   this tick; the rest goes to new nodes, cheapest fitting type first: by price per hour
   when every fitting type has one (`price_per_hour`), else by `cost_rank`.
   CPU-only demand never goes to a GPU node (existing, pending or new) while a CPU-only
   type fits it, even if that type is at its limit: the demand then waits rather than
   buying GPUs or keeping GPU nodes busy. Each new node takes as many copies of a shape as
   fit (100 x {CPU: 1} on 4-CPU nodes -> 25 nodes).
   Placement groups (`Snapshot.gangs`) come first, each all or nothing: its bundles go
   onto existing and pending nodes where they fit, the rest onto new nodes of the
   cheapest fitting type; STRICT_SPREAD puts one bundle per node (existing or new),
   STRICT_PACK needs one node that fits the sum of its bundles, PACK and SPREAD pack the
   rest onto as few new nodes as possible. If the limits (rule 4) do not allow every
   node the group needs, none is launched for it and a warning says why.
4. Limits on every launch: per-type and global `max_workers` (workers only), and
   `upscaling_speed` as in Ray: a type may have at most
   `max(5, int(upscaling_speed * max(running, 1)))` nodes pending, counting those already
   pending and those launched this tick. A type whose launch would go to a backed-off
   (type, zone, spot) everywhere is skipped; a spot type backed off in every zone falls
   back to on-demand if `fallback_to_on_demand` (`Launch.spot=False`). A type that names
   GPUs instead of an instance type carries its launch `options` (instance type, zone,
   spot, price; cheapest first, from the catalogue): it launches at the first option not
   backed off, so a capacity error moves it to the next cheapest type and zone.
5. Scale-down: a current worker idle longer than `idle_timeout_s` that got no demand this
   tick is terminated, longest-idle first, never below `min_workers` (the most recently
   busy are kept). Nodes running actors or holding primary object copies are never
   terminated: they are skipped with a warning (draining would not move their state).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from strato.catalog import LaunchOption
from strato.launcher.autoscaler.lifecycle import GONE, PENDING, NodeState

Resources = Mapping[str, float]

HEAD = "head"
WORKER = "worker"
GPU_COST_WEIGHT = 20.0
UPSCALING_INITIAL_NODES = 5
BACKOFF_BASE_S = 30.0
BACKOFF_FACTOR = 2.0
BACKOFF_CAP_S = 600.0
_EPS = 1e-9


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


# --- backoff (pure helpers for the applier) -----------------------------------------


def backoff_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th consecutive failure: 30 s, x2, capped at 10 min."""
    return min(BACKOFF_BASE_S * BACKOFF_FACTOR ** max(failures - 1, 0), BACKOFF_CAP_S)


def record_capacity_failure(
    backoffs: Iterable[TypeBackoff], node_type: str, zone: str | None, spot: bool, now: float,
    instance_type: str | None = None,
) -> list[TypeBackoff]:
    """Return backoffs with (node_type, zone, spot, instance_type) backed off one step
    longer than before."""
    key = (node_type, zone, spot, instance_type)
    kept: list[TypeBackoff] = []
    failures = 0
    for b in backoffs:
        if (b.node_type, b.zone, b.spot, b.instance_type) == key:
            failures = max(failures, b.failures)
        else:
            kept.append(b)
    failures += 1
    kept.append(TypeBackoff(node_type, zone, spot, now + backoff_delay(failures), failures,
                            instance_type))
    return kept


def clear_backoff(
    backoffs: Iterable[TypeBackoff], node_type: str, zone: str | None, spot: bool,
    instance_type: str | None = None,
) -> list[TypeBackoff]:
    """Return backoffs without (node_type, zone, spot, instance_type): a launch there just
    succeeded."""
    key = (node_type, zone, spot, instance_type)
    return [b for b in backoffs if (b.node_type, b.zone, b.spot, b.instance_type) != key]


def active_backoff(
    backoffs: Iterable[TypeBackoff], node_type: str, zone: str | None, spot: bool, now: float,
    instance_type: str | None = None,
) -> TypeBackoff | None:
    """The backoff that blocks launching node_type in zone now (zone None entries block all
    zones, instance_type None entries every instance type)."""
    for b in backoffs:
        if (
            b.node_type == node_type
            and b.spot == spot
            and b.until > now
            and (b.zone is None or b.zone == zone)
            and (b.instance_type is None or b.instance_type == instance_type)
        ):
            return b
    return None


def next_option(
    info: NodeTypeInfo, backoffs: Iterable[TypeBackoff], now: float
) -> LaunchOption | None:
    """How to launch `info` now, or None if every option is backed off.

    Types with `options` take the first one not backed off; others get `next_zone`'s
    (zone, spot) with no instance type (their node_config names it) and the type's price.
    """
    if info.options:
        backoffs = list(backoffs)
        for option in info.options:
            if active_backoff(backoffs, info.name, option.zone, option.spot, now,
                              option.instance_type) is None:
                return option
        return None
    mode = next_zone(info, backoffs, now)
    if mode is None:
        return None
    return LaunchOption(zone=mode[0], spot=mode[1])


def next_zone(
    info: NodeTypeInfo, backoffs: Iterable[TypeBackoff], now: float
) -> tuple[str | None, bool] | None:
    """Where to launch `info` now: (zone, spot), or None if every option is backed off.

    Spot types try their zones in order, then (if `fallback_to_on_demand`) on-demand in
    the same zone order. Types without zones use zone None. Types with `options`: the
    (zone, spot) of `next_option`.
    """
    if info.options:
        option = next_option(info, backoffs, now)
        return None if option is None else (option.zone, option.spot)
    backoffs = list(backoffs)
    zones: tuple[str | None, ...] = info.zones or (None,)
    modes = [True, False] if info.spot and info.fallback_to_on_demand else [info.spot]
    for spot in modes:
        for zone in zones:
            if active_backoff(backoffs, info.name, zone, spot, now) is None:
                return zone, spot
    return None


# --- resource arithmetic ------------------------------------------------------------


def fit_count(free: Resources, shape: Resources) -> int:
    """How many copies of `shape` fit into `free`."""
    n = sys.maxsize
    for key, need in shape.items():
        if need > 0:
            n = min(n, math.floor(free.get(key, 0.0) / need + _EPS))
    return max(n, 0)


def format_shape(shape: Resources) -> str:
    """`{CPU: 1, GPU: 0.5}`: compact, for reasons and warnings."""
    parts = []
    for key, value in shape.items():
        text = str(int(value)) if float(value).is_integer() else f"{value:g}"
        parts.append(f"{key}: {text}")
    return "{" + ", ".join(parts) + "}"


def _is_cpu_only(shape: Resources) -> bool:
    return shape.get("GPU", 0.0) <= 0


def _ffd_key(shape: Resources) -> tuple[float, float, float, float]:
    """Decreasing order for first-fit: scarce resources (GPU, custom) before CPU, memory."""
    custom = sum(v for k, v in shape.items() if k not in ("CPU", "GPU", "memory"))
    return (shape.get("GPU", 0.0), custom, shape.get("CPU", 0.0), shape.get("memory", 0.0))


# --- the planner --------------------------------------------------------------------


@dataclass
class _Bin:
    """Free resources of one node (existing, pending, or launched this tick)."""

    node_type: str
    free: dict[str, float]
    node_id: str | None = None  # None: launched this tick
    registered: bool = False
    used: bool = False

    def take(self, shape: Resources, copies: int) -> None:
        for key, need in shape.items():
            self.free[key] = self.free.get(key, 0.0) - need * copies
        self.used = True


@dataclass
class _Group:
    shape: Resources
    count: int
    skip_registered: bool


class _Planner:
    """Mutable working state of one `plan` call; nothing escapes but the Plan."""

    def __init__(self, s: Snapshot) -> None:
        self.s = s
        self.out = Plan()
        self.bins: list[_Bin] = []
        self.counted: Counter[str] = Counter()  # live workers, toward max_workers
        self.running: Counter[str] = Counter()  # base for upscaling_speed
        self.pending: Counter[str] = Counter()
        self.for_min: Counter[str] = Counter()  # current, live, non-draining workers
        self.launched: Counter[str] = Counter()
        self.launch_min: Counter[str] = Counter()
        self.launch_demand: dict[str, Counter[str]] = {}  # type -> shape text -> copies
        self.launch_demand_nodes: Counter[str] = Counter()
        self.replaces: dict[str, list[str]] = {}
        self.outdated_running: list[NodeInfo] = []
        self.idle_candidates: list[tuple[NodeInfo, float, _Bin]] = []
        self.modes: dict[str, tuple[str | None, bool] | None] = {
            name: next_zone(info, s.backoffs, s.now) for name, info in s.node_types.items()
        }

    # -- accounting

    def classify(self) -> None:
        for node in self.s.nodes:
            if node.kind == HEAD:
                self._classify_head(node)
            else:
                self._classify_worker(node)

    def _classify_head(self, node: NodeInfo) -> None:
        if node.state == NodeState.SETUP_FAILED:
            if node.setup_failures < self.s.max_setup_failures:
                self._retry_setup(node)
            else:
                self.out.warnings.append(
                    f"head {node.id}: setup failed {node.setup_failures} times; "
                    "the head is never terminated by the autoscaler"
                )
        elif node.state == NodeState.RUNNING and not node.draining:
            self.bins.append(self._bin(node, registered=True))

    def _classify_worker(self, node: NodeInfo) -> None:
        s, t = self.s, node.node_type
        info = s.node_types.get(t)
        if node.state in GONE:
            if node.preempted and node.state == NodeState.TERMINATED:
                self.replaces.setdefault(t, []).append(f"preempted node {node.id}")
            return
        if node.preempted:
            self.replaces.setdefault(t, []).append(f"preempted node {node.id}")
            if node.state in PENDING or node.state == NodeState.SETUP_FAILED:
                self._terminate(node, "spot preempted before it started running")
            elif node.idle_since is not None and not _protected(node):
                self._terminate(node, "spot preempted and idle: nothing left to drain")
            elif not (node.draining or node.state == NodeState.DRAINING):
                self.out.drain.append(
                    Drain(node.id, "spot preemption notice: take no new work before reclaim")
                )
            return
        outdated = info is None or not node.launch_hash_current
        why_outdated = "node type no longer in config" if info is None else "outdated launch hash"
        if node.state == NodeState.SETUP_FAILED:
            if outdated:
                self._terminate(node, f"setup failed and {why_outdated}")
            elif node.setup_failures >= s.max_setup_failures:
                self._terminate(
                    node,
                    f"setup failed {node.setup_failures} times (limit {s.max_setup_failures})",
                )
                self.replaces.setdefault(t, []).append(
                    f"node {node.id} (setup failed {node.setup_failures} times)"
                )
            else:
                if node.setup_retry_at is None or node.setup_retry_at <= s.now:
                    self._retry_setup(node)
                self._count_pending(node)
            return
        if node.state in PENDING:
            if outdated:
                self._terminate(node, f"{why_outdated}; not running yet")
            else:
                self._count_pending(node)
            return
        # RUNNING or DRAINING
        self.counted[t] += 1
        self.running[t] += 1
        if node.draining or node.state == NodeState.DRAINING:
            if node.idle_since is not None and not _protected(node):
                self._terminate(node, "drained and idle")
                self.counted[t] -= 1
            return
        if outdated:
            self.outdated_running.append(node)
            return
        self.for_min[t] += 1
        b = self._bin(node, registered=True)
        self.bins.append(b)
        if node.idle_since is not None:
            self.idle_candidates.append((node, node.idle_since, b))

    def _count_pending(self, node: NodeInfo) -> None:
        self.counted[node.node_type] += 1
        self.pending[node.node_type] += 1
        self.for_min[node.node_type] += 1
        info = self.s.node_types[node.node_type]
        self.bins.append(_Bin(node.node_type, dict(info.resources), node.id))

    def _bin(self, node: NodeInfo, registered: bool) -> _Bin:
        info = self.s.node_types.get(node.node_type)
        free = node.available if node.available is not None else (info.resources if info else {})
        return _Bin(node.node_type, dict(free), node.id, registered=registered)

    def _terminate(self, node: NodeInfo, reason: str) -> None:
        self.out.terminate.append(Terminate(node.id, reason))

    def _retry_setup(self, node: NodeInfo) -> None:
        attempt = node.setup_failures + 1
        self.out.retry_setup.append(
            RetrySetup(
                node.id,
                f"setup failed {node.setup_failures} time(s); "
                f"attempt {attempt} of {self.s.max_setup_failures}",
            )
        )

    # -- limits

    def headroom(self, t: str) -> int:
        """How many more nodes of type t may be launched this tick."""
        info, s = self.s.node_types[t], self.s
        if self.modes[t] is None:
            return 0
        room = sys.maxsize
        if info.max_workers is not None:
            room = min(room, info.max_workers - self.counted[t] - self.launched[t])
        if s.max_workers is not None:
            total = sum(self.counted.values()) + sum(self.launched.values())
            room = min(room, s.max_workers - total)
        allowed_pending = max(
            UPSCALING_INITIAL_NODES, int(s.upscaling_speed * max(self.running[t], 1))
        )
        room = min(room, allowed_pending - self.pending[t] - self.launched[t])
        return max(room, 0)

    def blocker(self, t: str) -> str:
        """Why type t cannot launch more right now (for warnings)."""
        info, s = self.s.node_types[t], self.s
        if self.modes[t] is None:
            return f"{t} backed off after capacity errors"
        if info.max_workers is not None and (
            self.counted[t] + self.launched[t] >= info.max_workers
        ):
            return f"{t} at max_workers {info.max_workers}"
        total = sum(self.counted.values()) + sum(self.launched.values())
        if s.max_workers is not None and total >= s.max_workers:
            return f"global max_workers {s.max_workers} reached"
        return f"{t} at upscaling_speed limit of pending nodes"

    def _launch(self, t: str, want: int) -> int:
        n = min(want, self.headroom(t))
        self.launched[t] += n
        return n

    # -- scale up

    def launch_min_workers(self) -> None:
        for t, info in self.s.node_types.items():
            need = info.min_workers - self.for_min[t]
            if need <= 0:
                continue
            n = self._launch(t, need)
            self.launch_min[t] += n
            self.bins.extend(_Bin(t, dict(info.resources)) for _ in range(n))
            if n < need:
                self.out.warnings.append(
                    f"min_workers: {t} needs {need} more, launching {n} ({self.blocker(t)})"
                )

    def place_gangs(self) -> None:
        for gang in self.s.gangs:
            self._place_gang(gang)

    def _place_gang(self, gang: GangDemand) -> None:
        """All of a placement group's bundles, or nothing: see rule 3."""
        bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in gang.bundles]
        bundles = [b for b in bundles if b]
        if not bundles:
            return
        strict_spread = gang.strategy == "STRICT_SPREAD"
        units = [_sum_shapes(bundles)] if gang.strategy == "STRICT_PACK" else bundles
        units.sort(key=_ffd_key, reverse=True)
        text = f"placement group {gang.strategy} of {len(bundles)} x " + ", ".join(
            sorted({format_shape(b) for b in bundles}))
        trial = {id(b): dict(b.free) for b in self.bins}
        on_bins: list[tuple[_Bin, Resources]] = []
        rest: list[Resources] = []
        used: set[int] = set()
        for shape in units:
            avoid_gpu = self._avoid_gpu(shape)
            b = next((b for b in self.bins
                      if not (strict_spread and id(b) in used)
                      and not (avoid_gpu and self._is_gpu_bin(b))
                      and fit_count(trial[id(b)], shape) > 0), None)
            if b is None:
                rest.append(shape)
                continue
            for key, need in shape.items():
                trial[id(b)][key] = trial[id(b)].get(key, 0.0) - need
            used.add(id(b))
            on_bins.append((b, shape))
        new: list[tuple[str, dict[str, float], list[Resources]]] = []
        for shape in rest:
            if not strict_spread:
                spot = next((n for n in new if fit_count(n[1], shape) > 0), None)
                if spot is not None:
                    for key, need in shape.items():
                        spot[1][key] = spot[1].get(key, 0.0) - need
                    spot[2].append(shape)
                    continue
            fitting = self._fitting_types(shape)
            if not fitting:
                self.out.warnings.append(f"infeasible: {text}: {format_shape(shape)} fits "
                                         "no node type")
                return
            chosen = Counter(t for t, _, _ in new)
            # the cheapest type with room left for one more; else the cheapest (to say why)
            info = next((i for i in fitting if self.headroom(i.name) > chosen[i.name]),
                        fitting[0])
            free = dict(info.resources)
            for key, need in shape.items():
                free[key] = free.get(key, 0.0) - need
            new.append((info.name, free, [shape]))
        need = Counter(t for t, _, _ in new)
        short = [t for t, n in need.items() if self.headroom(t) < n]
        s = self.s
        if not short and s.max_workers is not None:
            total = sum(self.counted.values()) + sum(self.launched.values())
            if total + sum(need.values()) > s.max_workers:
                short = list(need)
        if short:
            self.out.warnings.append(
                f"waiting: {text} needs {', '.join(f'{n} x {t}' for t, n in need.items())} "
                f"together ({'; '.join(self._gang_blocker(t, need[t]) for t in short)})")
            return
        for b, shape in on_bins:
            b.take(shape, 1)
            if b.node_id is None:
                self._note_demand(b.node_type, shape, 1)
        for t, _free, shapes in new:
            self.launched[t] += 1
            self.launch_demand_nodes[t] += 1
            b = _Bin(t, dict(self.s.node_types[t].resources))
            for shape in shapes:
                b.take(shape, 1)
                self._note_demand(t, shape, 1)
            self.bins.append(b)

    def _gang_blocker(self, t: str, n: int) -> str:
        info, s = self.s.node_types[t], self.s
        have = self.counted[t] + self.launched[t]
        if info.max_workers is not None and have + n > info.max_workers:
            return f"{t} at max_workers {info.max_workers} with {have}"
        total = sum(self.counted.values()) + sum(self.launched.values())
        if s.max_workers is not None and total + n > s.max_workers:
            return f"global max_workers {s.max_workers} with {total}"
        return self.blocker(t)

    def _fitting_types(self, shape: Resources) -> list[NodeTypeInfo]:
        """Types one node of which fits `shape`, cheapest first (as `_launch_for`)."""
        fitting = [i for i in self.s.node_types.values() if fit_count(i.resources, shape) > 0
                   and self.modes.get(i.name) is not None]
        if self._avoid_gpu(shape):
            fitting = [i for i in fitting if not i.has_gpu]
        if fitting and all(i.price_per_hour is not None for i in fitting):
            fitting.sort(key=lambda i: (i.price_per_hour, i.name))
        else:
            fitting.sort(key=lambda i: (i.cost_rank, i.name))
        return fitting

    def place_demand(self) -> None:
        for group in self._groups():
            if group.count > 0:
                self._pack_existing(group)
            if group.count > 0:
                self._launch_for(group)

    def _groups(self) -> list[_Group]:
        merged: dict[tuple, _Group] = {}
        for d in self.s.demand:
            shape = {k: float(v) for k, v in d.shape.items() if v > 0}
            if d.count <= 0 or not shape:
                continue
            key = (tuple(sorted(shape.items())), d.infeasible_on_current_nodes)
            if key in merged:
                merged[key].count += d.count
            else:
                merged[key] = _Group(shape, d.count, d.infeasible_on_current_nodes)
        return sorted(merged.values(), key=lambda g: _ffd_key(g.shape), reverse=True)

    def _avoid_gpu(self, shape: Resources) -> bool:
        """CPU-only demand stays off GPU nodes while a CPU-only type could take it."""
        return _is_cpu_only(shape) and any(
            not i.has_gpu and fit_count(i.resources, shape) > 0 for i in self.s.node_types.values()
        )

    def _is_gpu_bin(self, b: _Bin) -> bool:
        info = self.s.node_types.get(b.node_type)
        return info.has_gpu if info is not None else b.free.get("GPU", 0.0) > 0

    def _pack_existing(self, g: _Group) -> None:
        avoid_gpu = self._avoid_gpu(g.shape)
        for b in self.bins:
            if g.count == 0:
                return
            if (g.skip_registered and b.registered) or (avoid_gpu and self._is_gpu_bin(b)):
                continue
            k = min(g.count, fit_count(b.free, g.shape))
            if k > 0:
                b.take(g.shape, k)
                g.count -= k
                if b.node_id is None:
                    self._note_demand(b.node_type, g.shape, k)

    def _launch_for(self, g: _Group) -> None:
        fitting = [i for i in self.s.node_types.values() if fit_count(i.resources, g.shape) > 0]
        text = format_shape(g.shape)
        if not fitting:
            self.out.warnings.append(f"infeasible: {text} fits no node type ({g.count} pending)")
            return
        if self._avoid_gpu(g.shape):
            fitting = [i for i in fitting if not i.has_gpu]
        if all(i.price_per_hour is not None for i in fitting):
            fitting.sort(key=lambda i: (i.price_per_hour, i.name))
        else:
            fitting.sort(key=lambda i: (i.cost_rank, i.name))
        for info in fitting:
            per_node = fit_count(info.resources, g.shape)
            n = self._launch(info.name, math.ceil(g.count / per_node))
            for _ in range(n):
                k = min(g.count, per_node)
                b = _Bin(info.name, dict(info.resources))
                b.take(g.shape, k)
                self.bins.append(b)
                g.count -= k
                self._note_demand(info.name, g.shape, k)
            self.launch_demand_nodes[info.name] += n
            if g.count == 0:
                return
        blockers = "; ".join(self.blocker(i.name) for i in fitting)
        self.out.warnings.append(f"waiting: {g.count} x {text} ({blockers})")

    def _note_demand(self, t: str, shape: Resources, copies: int) -> None:
        self.launch_demand.setdefault(t, Counter())[format_shape(shape)] += copies

    def emit_launches(self) -> None:
        for t in self.s.node_types:
            mode = self.modes[t]
            if mode is None:
                continue
            spot = mode[1]
            suffix = ""
            if self.s.node_types[t].spot and not spot:
                suffix = "; fallback to on-demand: spot backed off in every zone"
            replaces = list(self.replaces.get(t, []))
            entries = []
            if self.launch_min[t]:
                have = self.for_min[t]
                want = self.s.node_types[t].min_workers
                entries.append((self.launch_min[t], f"min_workers: {t} has {have} of {want}"))
            if self.launch_demand_nodes[t]:
                shapes = ", ".join(f"{n} x {s}" for s, n in self.launch_demand[t].items())
                entries.append((self.launch_demand_nodes[t], f"demand: {shapes}"))
            option = next_option(self.s.node_types[t], self.s.backoffs, self.s.now)
            instance_type = option.instance_type if option is not None else None
            for count, reason in entries:
                mine, replaces = replaces[:count], replaces[count:]
                if mine:
                    reason = f"replace {', '.join(mine)}; {reason}"
                self.out.launch.append(Launch(t, count, reason + suffix, spot, instance_type))

    # -- scale down

    def scale_down(self) -> None:
        s = self.s
        removable = {t: self.for_min[t] - info.min_workers for t, info in s.node_types.items()}
        expired = [
            (node, idle_since)
            for node, idle_since, b in self.idle_candidates
            if not b.used and s.now - idle_since > s.idle_timeout_s
        ]
        expired.sort(key=lambda pair: (pair[1], pair[0].id))
        for node, idle_since in expired:
            if removable[node.node_type] <= 0:
                continue
            idle_for = s.now - idle_since
            why = f"idle {idle_for:.0f}s > idle timeout {s.idle_timeout_s:g}s"
            if self._keep_protected(node, why):
                continue
            self._terminate(node, why)
            removable[node.node_type] -= 1
        for node in self.outdated_running:
            if node.idle_since is None:
                continue
            why = (
                "outdated launch hash and idle"
                if node.node_type in s.node_types
                else "node type no longer in config and idle"
            )
            if not self._keep_protected(node, why):
                self._terminate(node, why)

    def _keep_protected(self, node: NodeInfo, why: str) -> bool:
        if not _protected(node):
            return False
        holds = " and ".join(
            w
            for w, on in (
                ("running actors", node.has_actors),
                ("holding primary object copies", node.holds_primary_objects),
            )
            if on
        )
        self.out.warnings.append(f"kept {node.id}: {why}, but {holds}")
        return True


def _sum_shapes(shapes: Iterable[Resources]) -> dict[str, float]:
    out: dict[str, float] = {}
    for shape in shapes:
        for key, value in shape.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _protected(node: NodeInfo) -> bool:
    """Terminating this node would lose actors or the only copy of objects."""
    return node.has_actors or node.holds_primary_objects


def plan(snapshot: Snapshot) -> Plan:
    """Decide launches, terminations, drains and setup retries for one autoscaler tick."""
    p = _Planner(snapshot)
    p.classify()
    p.launch_min_workers()
    p.place_gangs()
    p.place_demand()
    p.emit_launches()
    p.scale_down()
    return p.out
