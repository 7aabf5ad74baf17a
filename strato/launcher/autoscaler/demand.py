"""Scale-up in `plan()` for `min_workers` (rule 2) and for plain demand shapes (rule 3).

Demand is merged by shape and packed first-fit decreasing onto the free resources of
registered nodes, then pending ones, then nodes launched this tick; the rest goes to new
nodes of the cheapest fitting type, each taking as many copies as fit. CPU-only demand
never goes to a GPU node while a CPU-only type fits it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from strato.launcher.autoscaler.accounting import Accounting
from strato.launcher.autoscaler.options import cheapest_first
from strato.launcher.autoscaler.shapes import Bin, Resources, ffd_key, fit_count, format_shape


@dataclass
class _Group:
    shape: Resources
    count: int
    skip_registered: bool


def launch_min_workers(acct: Accounting) -> None:
    """Rule 2: launch up to each type's minimum."""
    for t, info in acct.s.node_types.items():
        need = info.min_workers - acct.for_min[t]
        if need <= 0:
            continue
        n = acct.reserve(t, need)
        acct.launch_min[t] += n
        acct.bins.extend(Bin(t, dict(info.resources)) for _ in range(n))
        if n < need:
            acct.out.warnings.append(
                f"min_workers: {t} needs {need} more, launching {n} ({acct.blocker(t)})"
            )


def place_demand(acct: Accounting) -> None:
    """Rule 3, plain demand: onto existing nodes first, the rest onto new ones."""
    for group in _groups(acct):
        if group.count > 0:
            _pack_existing(acct, group)
        if group.count > 0:
            _launch_for(acct, group)


def _groups(acct: Accounting) -> list[_Group]:
    merged: dict[tuple, _Group] = {}
    for d in acct.s.demand:
        shape = {k: float(v) for k, v in d.shape.items() if v > 0}
        if d.count <= 0 or not shape:
            continue
        key = (tuple(sorted(shape.items())), d.infeasible_on_current_nodes)
        if key in merged:
            merged[key].count += d.count
        else:
            merged[key] = _Group(shape, d.count, d.infeasible_on_current_nodes)
    return sorted(merged.values(), key=lambda g: ffd_key(g.shape), reverse=True)


def _pack_existing(acct: Accounting, g: _Group) -> None:
    avoid_gpu = acct.avoid_gpu(g.shape)
    for b in acct.bins:
        if g.count == 0:
            return
        if (g.skip_registered and b.registered) or (avoid_gpu and acct.is_gpu_bin(b)):
            continue
        k = min(g.count, fit_count(b.free, g.shape))
        if k > 0:
            b.take(g.shape, k)
            g.count -= k
            if b.node_id is None:
                acct.note_demand(b.node_type, g.shape, k)


def _launch_for(acct: Accounting, g: _Group) -> None:
    fitting = [i for i in acct.s.node_types.values() if fit_count(i.resources, g.shape) > 0]
    text = format_shape(g.shape)
    if not fitting:
        acct.out.warnings.append(f"infeasible: {text} fits no node type ({g.count} pending)")
        return
    if acct.avoid_gpu(g.shape):
        fitting = [i for i in fitting if not i.has_gpu]
    fitting = cheapest_first(fitting)
    for info in fitting:
        per_node = fit_count(info.resources, g.shape)
        n = acct.reserve(info.name, math.ceil(g.count / per_node))
        for _ in range(n):
            k = min(g.count, per_node)
            b = Bin(info.name, dict(info.resources))
            b.take(g.shape, k)
            acct.bins.append(b)
            g.count -= k
            acct.note_demand(info.name, g.shape, k)
        acct.launch_demand_nodes[info.name] += n
        if g.count == 0:
            return
    blockers = "; ".join(acct.blocker(i.name) for i in fitting)
    acct.out.warnings.append(f"waiting: {g.count} x {text} ({blockers})")
