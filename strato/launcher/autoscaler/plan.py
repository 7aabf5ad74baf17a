"""The autoscaler's decision as a pure function: `plan(snapshot) -> Plan`.

No I/O and no clocks (`Snapshot.now` is the time), so every rule is unit-tested with
plain data; the loop that reads the cluster and applies the plan is separate and thin.
Every action carries a human-readable reason that `strato status` shows.

This module runs the rules in order; each lives in its own module: `accounting` (1, 4),
`demand` (2, 3), `gangs` (3, placement groups), `options` (4: backoffs, fallback, prices),
`scale_down` (5). The records it reads and returns are in `records`.

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

from strato.launcher.autoscaler.accounting import Accounting
from strato.launcher.autoscaler.demand import launch_min_workers, place_demand
from strato.launcher.autoscaler.gangs import place_gangs
from strato.launcher.autoscaler.options import next_option
from strato.launcher.autoscaler.records import Launch, Plan, Snapshot
from strato.launcher.autoscaler.scale_down import scale_down


def plan(snapshot: Snapshot) -> Plan:
    """Decide launches, terminations, drains and setup retries for one autoscaler tick."""
    acct = Accounting(snapshot)
    acct.classify()
    launch_min_workers(acct)
    place_gangs(acct)
    place_demand(acct)
    _emit_launches(acct)
    scale_down(acct)
    return acct.out


def _emit_launches(acct: Accounting) -> None:
    """One `Launch` per type and reason (min_workers, demand), naming what it replaces."""
    for t in acct.s.node_types:
        mode = acct.modes[t]
        if mode is None:
            continue
        spot = mode[1]
        suffix = ""
        if acct.s.node_types[t].spot and not spot:
            suffix = "; fallback to on-demand: spot backed off in every zone"
        replaces = list(acct.replaces.get(t, []))
        entries = []
        if acct.launch_min[t]:
            have = acct.for_min[t]
            want = acct.s.node_types[t].min_workers
            entries.append((acct.launch_min[t], f"min_workers: {t} has {have} of {want}"))
        if acct.launch_demand_nodes[t]:
            shapes = ", ".join(f"{n} x {s}" for s, n in acct.launch_demand[t].items())
            entries.append((acct.launch_demand_nodes[t], f"demand: {shapes}"))
        option = next_option(acct.s.node_types[t], acct.s.backoffs, acct.s.now)
        instance_type = option.instance_type if option is not None else None
        for count, reason in entries:
            mine, replaces = replaces[:count], replaces[count:]
            if mine:
                reason = f"replace {', '.join(mine)}; {reason}"
            acct.out.launch.append(Launch(t, count, reason + suffix, spot, instance_type))
