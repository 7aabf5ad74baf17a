"""Placement groups in `plan()`: each gang's bundles get room together, or none do.

A gang's bundles go onto existing and pending nodes where they fit, the rest onto new
nodes of the cheapest fitting type; STRICT_SPREAD puts one bundle per node, STRICT_PACK
needs one node that fits the sum of its bundles, PACK and SPREAD pack the rest onto as
few new nodes as possible. If the limits do not allow every node the group needs, none
is launched for it and a warning says why. Apart from plain demand because all-or-nothing
needs a trial placement that plain demand does not.
"""

from __future__ import annotations

from collections import Counter

from strato.launcher.autoscaler.accounting import Accounting
from strato.launcher.autoscaler.options import cheapest_first
from strato.launcher.autoscaler.records import GangDemand, NodeTypeInfo
from strato.launcher.autoscaler.shapes import (
    Bin,
    Resources,
    ffd_key,
    fit_count,
    format_shape,
    sum_shapes,
)


def place_gangs(acct: Accounting) -> None:
    """Rule 3, placement groups: before plain demand, in the order the head lists them."""
    for gang in acct.s.gangs:
        _place_gang(acct, gang)


def _place_gang(acct: Accounting, gang: GangDemand) -> None:
    """All of a placement group's bundles, or nothing."""
    bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in gang.bundles]
    bundles = [b for b in bundles if b]
    if not bundles:
        return
    strict_spread = gang.strategy == "STRICT_SPREAD"
    units = [sum_shapes(bundles)] if gang.strategy == "STRICT_PACK" else bundles
    units.sort(key=ffd_key, reverse=True)
    text = f"placement group {gang.strategy} of {len(bundles)} x " + ", ".join(
        sorted({format_shape(b) for b in bundles}))
    trial = {id(b): dict(b.free) for b in acct.bins}
    on_bins: list[tuple[Bin, Resources]] = []
    rest: list[Resources] = []
    used: set[int] = set()
    for shape in units:
        avoid_gpu = acct.avoid_gpu(shape)
        b = next((b for b in acct.bins
                  if not (strict_spread and id(b) in used)
                  and not (avoid_gpu and acct.is_gpu_bin(b))
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
        fitting = _fitting_types(acct, shape)
        if not fitting:
            acct.out.warnings.append(f"infeasible: {text}: {format_shape(shape)} fits "
                                     "no node type")
            return
        chosen = Counter(t for t, _, _ in new)
        # the cheapest type with room left for one more; else the cheapest (to say why)
        info = next((i for i in fitting if acct.headroom(i.name) > chosen[i.name]),
                    fitting[0])
        free = dict(info.resources)
        for key, need in shape.items():
            free[key] = free.get(key, 0.0) - need
        new.append((info.name, free, [shape]))
    need = Counter(t for t, _, _ in new)
    short = [t for t, n in need.items() if acct.headroom(t) < n]
    s = acct.s
    if not short and s.max_workers is not None:
        total = sum(acct.counted.values()) + sum(acct.launched.values())
        if total + sum(need.values()) > s.max_workers:
            short = list(need)
    if short:
        acct.out.warnings.append(
            f"waiting: {text} needs {', '.join(f'{n} x {t}' for t, n in need.items())} "
            f"together ({'; '.join(_gang_blocker(acct, t, need[t]) for t in short)})")
        return
    for b, shape in on_bins:
        b.take(shape, 1)
        if b.node_id is None:
            acct.note_demand(b.node_type, shape, 1)
    for t, _free, shapes in new:
        acct.launched[t] += 1
        acct.launch_demand_nodes[t] += 1
        b = Bin(t, dict(acct.s.node_types[t].resources))
        for shape in shapes:
            b.take(shape, 1)
            acct.note_demand(t, shape, 1)
        acct.bins.append(b)


def _gang_blocker(acct: Accounting, t: str, n: int) -> str:
    info, s = acct.s.node_types[t], acct.s
    have = acct.counted[t] + acct.launched[t]
    if info.max_workers is not None and have + n > info.max_workers:
        return f"{t} at max_workers {info.max_workers} with {have}"
    total = sum(acct.counted.values()) + sum(acct.launched.values())
    if s.max_workers is not None and total + n > s.max_workers:
        return f"global max_workers {s.max_workers} with {total}"
    return acct.blocker(t)


def _fitting_types(acct: Accounting, shape: Resources) -> list[NodeTypeInfo]:
    """Types one node of which fits `shape` and that may launch now, cheapest first."""
    fitting = [i for i in acct.s.node_types.values() if fit_count(i.resources, shape) > 0
               and acct.modes.get(i.name) is not None]
    if acct.avoid_gpu(shape):
        fitting = [i for i in fitting if not i.has_gpu]
    return cheapest_first(fitting)
