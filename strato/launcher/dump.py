"""``strato cluster-dump``: the logs and state of every node in one archive, for a bug
report or a look after the fact (as Ray's ``ray cluster-dump``).

The archive (``.tar.gz``) holds ``status.json`` (what ``strato status --json`` says, or
why it could not be had), ``launcher/`` (this machine's logs of the cluster:
``$STRATO_HOME/logs/<cluster>``), and per live node ``nodes/<kind>-<id>/``: its runtime
logs and, for the head, the monitor's log and its own logs directory (autoscaler events,
setup logs of the nodes it launched). A node that cannot be reached gets an ``ERROR.txt``
instead. Every file is redacted on the way in: the cluster token and any private key
block never reach the archive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from strato.exceptions import LauncherError
from strato.launcher import commands
from strato.launcher.cluster import Cluster, open_cluster
from strato.launcher.console import say
from strato.providers.base import Node, NodeKind

__all__ = ["cluster_dump"]

PARALLEL_NODES = 8
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?"
                          rb"-----END [A-Z0-9 ]*PRIVATE KEY-----", re.S)
REDACTED = b"***"


def cluster_dump(config_path: str | os.PathLike, output: str | os.PathLike | None = None
                 ) -> Path:
    """Write the archive (default ``strato-dump-<cluster>-<time>.tar.gz`` here); returns
    its path. Unreachable nodes are noted in the archive, not fatal."""
    cluster = open_cluster(config_path, echo=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"strato-dump-{cluster.name}-{stamp}"
    target = Path(output) if output else Path.cwd() / f"{name}.tar.gz"
    with tempfile.TemporaryDirectory(prefix="strato-dump-") as tmp:
        root = Path(tmp) / name
        root.mkdir()
        try:
            info = commands.status(config_path)
            (root / "status.json").write_text(json.dumps(info, indent=2, default=str))
        except Exception as e:  # a dump is most wanted when things are broken
            (root / "status-error.txt").write_text(f"strato status failed: {e}\n")
        launcher_logs = cluster.state.log_dir(cluster.name)
        if launcher_logs.is_dir():
            shutil.copytree(launcher_logs, root / "launcher", symlinks=True)
        nodes = cluster.nodes()
        if nodes:
            with ThreadPoolExecutor(min(PARALLEL_NODES, len(nodes))) as pool:
                list(pool.map(lambda n: _dump_node(cluster, n, root / "nodes"), nodes))
        if cluster.monitor_mode == "local":  # the monitor ran here: its own log
            log = Path(commands.monitor_log_path(cluster, None))
            if log.is_file():
                (root / "monitor").mkdir()
                shutil.copy2(log, root / "monitor" / log.name)
        (root / "dump.json").write_text(json.dumps({
            "cluster": cluster.name, "provider": cluster.kind, "time": time.time(),
            "config": str(config_path), "monitor": cluster.monitor_mode,
            "nodes": [{"id": n.id, "kind": n.kind, "type": n.node_type} for n in nodes],
        }, indent=2))
        _redact_tree(root, [cluster.token] if cluster.token else [])
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=name)
        partial.replace(target)
    say(f"cluster dump of {len(nodes)} node(s) written to {target}")
    return target


def _dump_node(cluster: Cluster, node: Node, into: Path) -> None:
    """Fetch one node's logs into ``into/<kind>-<id>``; failures become ERROR.txt."""
    here = into / f"{node.kind or 'node'}-{node.id}"
    here.mkdir(parents=True, exist_ok=True)
    wanted = [(f"{cluster.temp_dir_path(node)}/logs", "logs")]
    if node.kind == NodeKind.HEAD.value and cluster.monitor_mode == "head":
        mdir = cluster.monitor_dir(node)
        wanted += [(commands.monitor_log_path(cluster, node), "monitor.log"),
                   (f"{mdir}/home/logs", "monitor-home-logs")]  # events, setup logs
    errors = []
    try:
        runner = cluster.runner(node, echo=False, connect_timeout=10)
        for remote, local in wanted:
            try:
                runner.get(remote, here / local)
            except (LauncherError, OSError) as e:
                errors.append(f"{remote}: {e}")
    except LauncherError as e:
        errors.append(str(e))
    if errors:
        (here / "ERROR.txt").write_text(f"{cluster.label(node)}:\n" + "\n".join(errors) + "\n")


def _redact_tree(root: Path, secrets: list[str]) -> None:
    """Replace every secret (and private key blocks) in every file under ``root``."""
    needles = [s.encode() for s in secrets if s]
    for path in root.rglob("*"):
        if path.is_symlink():
            path.unlink()  # nothing from outside the dump
            continue
        if not path.is_file():
            continue
        data = path.read_bytes()
        clean = _PRIVATE_KEY.sub(REDACTED, data)
        for needle in needles:
            clean = clean.replace(needle, REDACTED)
        if clean != data:
            path.write_bytes(clean)
