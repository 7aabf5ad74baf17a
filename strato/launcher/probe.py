"""``python -m strato.launcher.probe``: what the launcher asks a head over SSH.

Prints one JSON line: ``{"running": false}`` when no runtime runs from ``--temp-dir``,
else ``{"running": true, "head_address", "nodes": [...], "demand": [...], "activity":
{...}}`` (activity: what autostop judges idleness by) read through
a ``HeadClient`` attached to the local node (nodes in the head's one node schema:
``node_id``, ``alive``, ``labels``, ``resources``, ``idle_seconds``...).

With ``--node-losses [--since T]`` it prints ``{"now", "losses": [...]}`` instead: the
head's node-loss events, which ``strato submit --spot-recovery`` reads. Never prints the
token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from strato.runtime.session import DEFAULT_TEMP_DIR, node_files


def probe(temp_dir: str) -> dict:
    nodes = node_files(temp_dir)
    if not nodes:
        return {"running": False}
    info = {"running": True, "head_address": nodes[0]["head_address"],
            "head": bool(nodes[0].get("head"))}
    from strato.runtime.head_client import HeadClient

    with HeadClient(temp_dir) as head:
        info["nodes"] = head.nodes()
        info["demand"] = head.demand()
        try:
            info["activity"] = head.activity()
        except Exception:  # a head older than the activity RPC
            info["activity"] = None
    return info


# Head runtime events that mean a node was lost (or is about to be): a job that fails
# after one of these is treated as preempted by `strato submit --spot-recovery`.
NODE_LOSS_KINDS = ("preemption-notice", "node-dead")


def runtime_node_losses(temp_dir: str, since: float | None) -> dict[str, Any]:
    """``{"now": head clock, "losses": [...]}``: node-loss events of the head at or after
    ``since`` (head clock), read through a ``HeadClient`` attached to the node in
    ``temp_dir``."""
    from strato.runtime.head_client import HeadClient

    with HeadClient(temp_dir) as head:
        events = head.events()
    losses = [e for e in events if e.get("kind") in NODE_LOSS_KINDS
              and (since is None or float(e.get("time", 0.0)) >= since)]
    return {"now": time.time(), "losses": losses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strato.launcher.probe")
    parser.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    parser.add_argument("--node-losses", action="store_true",
                        help="print the head's node-loss events (spot recovery)")
    parser.add_argument("--since", type=float, default=None)
    args = parser.parse_args(argv)
    if args.node_losses:
        try:
            out = runtime_node_losses(args.temp_dir, args.since)
        except Exception as e:  # the head may be gone: say so, in JSON
            out = {"now": time.time(), "losses": None, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        return 0
    try:
        info = probe(args.temp_dir)
    except Exception as e:  # the head may be starting or gone: say so, in JSON
        info = {"running": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(info, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
