"""Where a machine's runtime processes leave notes for each other: node files, tokens."""

from __future__ import annotations

import json
import os

import psutil

# not "/tmp/strato": a folder named like the package in the cwd would shadow an editable install
DEFAULT_TEMP_DIR = os.path.join("/tmp", "strato-runtime")


def node_files(temp_dir: str, *, dead: bool = False) -> list[dict]:
    """Node files of live runtime processes under ``temp_dir``, newest first (with
    ``dead``: those whose process is gone, e.g. killed, so their leftovers can go)."""
    out = []
    nodes_dir = os.path.join(temp_dir, "nodes")
    try:
        names = os.listdir(nodes_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(nodes_dir, name)
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(info.get("pid", -1)) == dead:
            continue
        info["_file"] = path
        out.append(info)
    out.sort(key=lambda i: i.get("started", 0), reverse=True)
    return out


def read_token(info: dict) -> str:
    with open(info["token_file"]) as f:
        return f.read().strip()
