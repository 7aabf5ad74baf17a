"""The head's tables on its own disk (SQLite), so a restarted head resumes.

Kept: the cluster token, every actor that is not dead (spec, metadata, class blob,
name, namespace, detached, restarts left, and the node it was last placed on), and every
durable call within its retention (spec, function, and whether it finished; its argument
and result values are files next to this one, see ``agent/durable.py``). A head
that starts on the same temp dir reads them back: nodes that survived re-register and
say which actors they still host, so named and detached actors are found again; actors
no node claims within the grace period restart (``max_restarts``) or die. What lives
only as long as the head process (live node records, views, jobs of drivers that were
attached to it) is rebuilt from what nodes send when they come back.

Writes are one small transaction per actor change or durable call (WAL,
synchronous=NORMAL): actor creations and deaths, spawns and their results, never per
plain task.
"""

from __future__ import annotations

import os
import pickle
import sqlite3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS actors (actor_id BLOB PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS durable (call_id BLOB PRIMARY KEY, record BLOB NOT NULL);
"""


class HeadStore:
    """One SQLite file (0600) under the head's temp dir."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------ meta
    def get(self, key: str):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------ actors
    def save_actor(self, actor_id: bytes, fields: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO actors (actor_id, record) VALUES (?, ?)",
                         (actor_id, pickle.dumps(fields, protocol=5)))

    def drop_actor(self, actor_id: bytes) -> None:
        self._db.execute("DELETE FROM actors WHERE actor_id = ?", (actor_id,))

    def actors(self) -> dict[bytes, dict]:
        # our own file, 0600 in a 0700 dir: what we pickled ourselves
        return {row[0]: pickle.loads(row[1])
                for row in self._db.execute("SELECT actor_id, record FROM actors")}

    # ------------------------------------------------------------ durable calls
    def save_durable(self, call_id: bytes, fields: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO durable (call_id, record) VALUES (?, ?)",
                         (call_id, pickle.dumps(fields, protocol=5)))

    def drop_durable(self, call_id: bytes) -> None:
        self._db.execute("DELETE FROM durable WHERE call_id = ?", (call_id,))

    def durable_calls(self) -> dict[bytes, dict]:
        return {row[0]: pickle.loads(row[1])
                for row in self._db.execute("SELECT call_id, record FROM durable")}
