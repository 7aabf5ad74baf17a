"""Scale-down in `plan()` (rule 5): which idle or outdated workers to terminate.

A current worker idle longer than `idle_timeout_s` that got no demand this tick is
terminated, longest-idle first, never below `min_workers`; outdated running workers go
once idle. Nodes running actors or holding primary object copies are kept with a
warning, since draining would not move their state.
"""

from __future__ import annotations

from strato.launcher.autoscaler.accounting import Accounting, protected
from strato.launcher.autoscaler.records import NodeInfo


def scale_down(acct: Accounting) -> None:
    """Terminate expired idle workers (after placement, so bins that got demand stay)."""
    s = acct.s
    removable = {t: acct.for_min[t] - info.min_workers for t, info in s.node_types.items()}
    expired = [
        (node, idle_since)
        for node, idle_since, b in acct.idle_candidates
        if not b.used and s.now - idle_since > s.idle_timeout_s
    ]
    expired.sort(key=lambda pair: (pair[1], pair[0].id))
    for node, idle_since in expired:
        if removable[node.node_type] <= 0:
            continue
        idle_for = s.now - idle_since
        why = f"idle {idle_for:.0f}s > idle timeout {s.idle_timeout_s:g}s"
        if _keep_protected(acct, node, why):
            continue
        acct.terminate(node, why)
        removable[node.node_type] -= 1
    for node in acct.outdated_running:
        if node.idle_since is None:
            continue
        why = (
            "outdated launch hash and idle"
            if node.node_type in s.node_types
            else "node type no longer in config and idle"
        )
        if not _keep_protected(acct, node, why):
            acct.terminate(node, why)


def _keep_protected(acct: Accounting, node: NodeInfo, why: str) -> bool:
    if not protected(node):
        return False
    holds = " and ".join(
        w
        for w, on in (
            ("running actors", node.has_actors),
            ("holding primary object copies", node.holds_primary_objects),
        )
        if on
    )
    acct.out.warnings.append(f"kept {node.id}: {why}, but {holds}")
    return True
