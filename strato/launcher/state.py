"""The launcher's local memory: one SQLite database of clusters under ``$STRATO_HOME``.

Kept: per cluster its provider, config path and hash, head address, token, timestamps,
and a short list of recent events (``strato status`` shows them). The token lives in a
0600 file beside the database (``secrets/<cluster>.token``), never in a log. Per-cluster
logs go to ``$STRATO_HOME/logs/<cluster>/``. ``down`` never trusts this state to find
nodes (providers' tags do that); it only removes it at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from strato.localfiles import strato_home, write_secret

__all__ = ["ClusterRecord", "NodeCostRecord", "StateDB"]

DB_NAME = "state.db"
MAX_EVENTS = 200  # per cluster; older ones are dropped

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    config_path TEXT NOT NULL,
    config_hash TEXT NOT NULL DEFAULT '',
    head_address TEXT,
    token_path TEXT,
    facts TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    time REAL NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_cluster ON events (cluster, id);
CREATE TABLE IF NOT EXISTS node_costs (
    cluster TEXT NOT NULL,
    node_id TEXT NOT NULL,
    provider TEXT NOT NULL DEFAULT '',
    node_type TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    instance_type TEXT NOT NULL DEFAULT '',
    zone TEXT NOT NULL DEFAULT '',
    spot INTEGER NOT NULL DEFAULT 0,
    price REAL,
    price_source TEXT NOT NULL DEFAULT '',
    launched REAL NOT NULL,
    last_seen REAL NOT NULL,
    ended REAL,
    PRIMARY KEY (cluster, node_id)
);
"""


@dataclass(frozen=True)
class ClusterRecord:
    """One row of ``clusters``; the token itself is read with ``StateDB.token``."""

    name: str
    provider: str
    config_path: str
    config_hash: str
    head_address: str | None
    token_path: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class NodeCostRecord:
    """One node's billing facts, kept after ``down`` so ``cost-report`` shows past clusters.

    ``price`` is USD per hour as launched (None: unknown); ``ended`` None while the node
    lives (or if its end was never seen: then ``last_seen`` bounds it).
    """

    cluster: str
    node_id: str
    provider: str
    node_type: str
    kind: str
    instance_type: str
    zone: str
    spot: bool
    price: float | None
    price_source: str
    launched: float
    last_seen: float
    ended: float | None


_COST_COLUMNS = ("cluster, node_id, provider, node_type, kind, instance_type, zone, spot, "
                 "price, price_source, launched, last_seen, ended")


class StateDB:
    """The clusters database; every call opens a short transaction (safe across processes)."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home is not None else strato_home()
        self.path = self.home / DB_NAME

    # ------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():  # create it 0600: it names hosts and token files
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            conn.executescript(_SCHEMA)
            with conn:
                yield conn
        finally:
            conn.close()

    def log_dir(self, cluster: str) -> Path:
        """Where setup, runtime start and monitor output of ``cluster`` is kept."""
        path = self.home / "logs" / cluster
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def token_path(self, cluster: str) -> Path:
        return self.home / "secrets" / f"{cluster}.token"

    def ca_paths(self, cluster: str) -> tuple[Path, Path]:
        """The cluster CA's key and certificate (0600, beside the token)."""
        return (self.home / "secrets" / f"{cluster}.ca.key",
                self.home / "secrets" / f"{cluster}.ca.crt")

    # ------------------------------------------------------------ clusters
    def get(self, name: str) -> ClusterRecord | None:
        if not self.path.exists():  # reading never creates the database
            return None
        with self._db() as db:
            row = db.execute("SELECT name, provider, config_path, config_hash, head_address, "
                             "token_path, created, updated FROM clusters WHERE name = ?",
                             (name,)).fetchone()
        return ClusterRecord(*row) if row else None

    def list(self) -> list[ClusterRecord]:
        if not self.path.exists():
            return []
        with self._db() as db:
            rows = db.execute("SELECT name, provider, config_path, config_hash, head_address, "
                              "token_path, created, updated FROM clusters ORDER BY name")
            return [ClusterRecord(*r) for r in rows.fetchall()]

    def upsert(self, name: str, *, provider: str, config_path: str, config_hash: str) -> None:
        """Record (or refresh) a cluster's provider and config."""
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO clusters (name, provider, config_path, config_hash, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                " provider = excluded.provider, config_path = excluded.config_path,"
                " config_hash = excluded.config_hash, updated = excluded.updated",
                (name, provider, config_path, config_hash, now, now))

    def set_head(self, name: str, head_address: str | None) -> None:
        with self._db() as db:
            db.execute("UPDATE clusters SET head_address = ?, updated = ? WHERE name = ?",
                       (head_address, time.time(), name))

    def set_facts(self, name: str, facts: dict) -> None:
        """Remember what the provider's ``prepare`` said (key path, user): never secrets."""
        with self._db() as db:
            db.execute("UPDATE clusters SET facts = ?, updated = ? WHERE name = ?",
                       (json.dumps(facts, default=str), time.time(), name))

    def facts(self, name: str) -> dict:
        if not self.path.exists():
            return {}
        with self._db() as db:
            row = db.execute("SELECT facts FROM clusters WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def token(self, name: str) -> str | None:
        """The cluster token, or None if none was made yet."""
        path = self.token_path(name)
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def ensure_token(self, name: str) -> str:
        """The cluster's token, generated (and saved 0600) on first use."""
        token = self.token(name)
        if token is None:
            token = secrets.token_hex(16)
            self.save_token(name, token)
        return token

    def save_token(self, name: str, token: str) -> None:
        path = self.token_path(name)
        write_secret(path, token)
        with self._db() as db:
            db.execute("UPDATE clusters SET token_path = ? WHERE name = ?", (str(path), name))

    def ensure_ca(self, name: str) -> tuple[bytes, bytes]:
        """The cluster CA (key PEM, cert PEM), made (and saved 0600) on first use: every
        node certificate of the cluster is issued from it at bootstrap."""
        from strato.runtime import tls

        key_path, cert_path = self.ca_paths(name)
        try:
            return key_path.read_bytes(), cert_path.read_bytes()
        except FileNotFoundError:
            pass
        key, cert = tls.make_ca(name)
        write_secret(key_path, key)
        write_secret(cert_path, cert)
        return key, cert

    def delete(self, name: str) -> None:
        """Forget ``name``: its row, events, token file and logs (its cost history stays,
        for ``cost-report``)."""
        with self._db() as db:
            db.execute("DELETE FROM clusters WHERE name = ?", (name,))
            db.execute("DELETE FROM events WHERE cluster = ?", (name,))
        for path in (self.token_path(name), *self.ca_paths(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(self.home / "logs" / name, ignore_errors=True)

    # ------------------------------------------------------------ cost history
    def record_nodes(self, records: list[NodeCostRecord]) -> None:
        """Remember nodes seen (upsert): the earliest launch, the latest sighting, the first
        end seen; a known price is never replaced by an unknown one."""
        if not records:
            return
        with self._db() as db:
            db.executemany(
                f"INSERT INTO node_costs ({_COST_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(cluster, node_id) DO UPDATE SET"
                " launched = MIN(launched, excluded.launched),"
                " last_seen = MAX(last_seen, excluded.last_seen),"
                " ended = COALESCE(ended, excluded.ended),"
                " price = COALESCE(price, excluded.price),"
                " price_source = CASE WHEN price IS NULL THEN excluded.price_source"
                " ELSE price_source END,"
                " instance_type = COALESCE(NULLIF(excluded.instance_type, ''), instance_type),"
                " zone = COALESCE(NULLIF(excluded.zone, ''), zone)",
                [(r.cluster, r.node_id, r.provider, r.node_type, r.kind, r.instance_type,
                  r.zone, int(r.spot), r.price, r.price_source, r.launched, r.last_seen,
                  r.ended) for r in records])

    def end_nodes(self, cluster: str, when: float, node_ids: list[str] | None = None) -> None:
        """Mark nodes (default: every node of ``cluster`` still open) as ended at ``when``."""
        with self._db() as db:
            if node_ids is None:
                db.execute("UPDATE node_costs SET ended = ?, last_seen = MAX(last_seen, ?) "
                           "WHERE cluster = ? AND ended IS NULL", (when, when, cluster))
            else:
                db.executemany("UPDATE node_costs SET ended = ?, last_seen = MAX(last_seen, ?)"
                               " WHERE cluster = ? AND node_id = ? AND ended IS NULL",
                               [(when, when, cluster, n) for n in node_ids])

    def node_costs(self, cluster: str | None = None) -> list[NodeCostRecord]:
        """Cost history of one cluster or all, oldest launch first."""
        if not self.path.exists():
            return []
        where, args = ("WHERE cluster = ?", (cluster,)) if cluster else ("", ())
        with self._db() as db:
            rows = db.execute(f"SELECT {_COST_COLUMNS} FROM node_costs {where} "
                              "ORDER BY launched, node_id", args).fetchall()
        return [NodeCostRecord(*r[:7], bool(r[7]), *r[8:]) for r in rows]

    # ------------------------------------------------------------ events
    def add_event(self, cluster: str, message: str, node: str = "") -> None:
        """Remember something that happened (node created, setup failed, ...)."""
        with self._db() as db:
            db.execute("INSERT INTO events (cluster, time, node, message) VALUES (?, ?, ?, ?)",
                       (cluster, time.time(), node, message))
            db.execute("DELETE FROM events WHERE cluster = ? AND id NOT IN (SELECT id FROM "
                       "events WHERE cluster = ? ORDER BY id DESC LIMIT ?)",
                       (cluster, cluster, MAX_EVENTS))

    def events(self, cluster: str, limit: int = 20) -> list[dict]:
        """The ``limit`` most recent events, oldest first."""
        if not self.path.exists():
            return []
        with self._db() as db:
            rows = db.execute("SELECT time, node, message FROM events WHERE cluster = ? "
                              "ORDER BY id DESC LIMIT ?", (cluster, limit)).fetchall()
        return [{"time": t, "node": n, "message": m} for t, n, m in reversed(rows)]
