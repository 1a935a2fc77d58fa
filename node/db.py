"""The node's SQLite database: one file for the dataset registry, plan decisions, the audit trail,
the running node's state and the web console's accounts and sessions."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    path TEXT NOT NULL,
    tags TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    target TEXT,
    labels TEXT,
    meta TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    job TEXT,
    round INTEGER,
    dataset TEXT,
    plan_sha256 TEXT,
    actor TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_job ON audit(job);
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY,
    class_name TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    first_job TEXT NOT NULL,
    first_sender TEXT NOT NULL,
    seen_at REAL NOT NULL,
    decided_at REAL,
    decided_by TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS node_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    dataset TEXT NOT NULL,
    sender TEXT NOT NULL,
    wire BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS privacy_spend (
    dataset TEXT NOT NULL,
    job TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (dataset, job)
);
CREATE TABLE IF NOT EXISTS statistics_queries (
    dataset TEXT NOT NULL,
    actor TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS statistics_queries_dataset ON statistics_queries(dataset, ts);
CREATE TABLE IF NOT EXISTS ui_users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ui_sessions (
    token_sha256 TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    flash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS ui_login_failures (
    ts REAL NOT NULL,
    username TEXT NOT NULL,
    client TEXT NOT NULL
);
"""


class Database:
    """A thread-safe SQLite connection with the node schema applied."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: every commit survives a crash of the node process; only an OS crash or
        # power loss can drop the last commits (FULL would fsync each audit line, twice a round)
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def execute(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.execute(sql, params)
            cols = [c[0] for c in cur.description] if cur.description else []
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]  # type: ignore[misc]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
