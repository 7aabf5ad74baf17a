"""``python -m strato.launcher.probe``: what the launcher asks a head over SSH.

Prints one JSON line: ``{"running": false}`` when no runtime runs from ``--temp-dir``,
else ``{"running": true, "head_address", "nodes": [...], "demand": [...]}`` read through
a ``HeadClient`` attached to the local node (nodes in the head's one node schema:
``node_id``, ``alive``, ``labels``, ``resources``, ``idle_seconds``...). Never prints
the token.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strato.launcher.probe")
    parser.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    args = parser.parse_args(argv)
    try:
        info = probe(args.temp_dir)
    except Exception as e:  # the head may be starting or gone: say so, in JSON
        info = {"running": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(info, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
