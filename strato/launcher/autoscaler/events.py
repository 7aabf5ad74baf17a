"""The autoscaler's decision log: one JSON object per line, read by `strato status`.

A plain file (not the state database) so the loop can write it wherever it runs (on the
head or on this machine) and `status` can fetch and merge it cheaply. Each record has
``time``, ``kind`` (launch, terminate, drain, capacity-error, fallback, ...), ``node``
and a human-readable ``message`` with the reason; extra fields are kept as given.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENTS_FILE = "autoscaler-events.jsonl"
MAX_BYTES = 512 * 1024  # past this the file is cut to its last KEEP_LINES lines
KEEP_LINES = 1000


class EventLog:
    """Append-only, thread-safe (bootstraps report from their threads) JSON-lines log."""

    def __init__(self, path: str | os.PathLike[str],
                 echo: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.echo = echo
        self._lock = threading.Lock()

    def record(self, kind: str, message: str, node: str = "", **fields: Any) -> dict[str, Any]:
        """Append one event and return it."""
        event = {"time": time.time(), "kind": kind, "node": node, "message": message, **fields}
        line = json.dumps(event, default=str)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.path, "a") as f:
                f.write(line + "\n")
            if self.path.stat().st_size > MAX_BYTES:
                self._trim()
        if self.echo is not None:
            who = f" {node}" if node else ""
            self.echo(f"{time.strftime('%H:%M:%S')} {kind}{who}: {message}")
        return event

    def _trim(self) -> None:
        lines = self.path.read_text().splitlines()[-KEEP_LINES:]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.path)

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` events (all if None), oldest first."""
        return read_events(self.path, limit)


def read_events(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Events from a log file, oldest first; unreadable lines (a write cut short) skipped."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines[-limit:] if limit else lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out
