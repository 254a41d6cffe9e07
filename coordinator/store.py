"""SQLite persistence for the coordinator.

One connection, one writer thread: every query runs on a single-thread executor so the
event loop never blocks on disk and SQLite never sees concurrent writers. WAL mode plus a
commit per write means ``kill -9`` loses nothing that was acknowledged to a client.

Schemas are versioned per component (``membership``, later ``runs``, ``checkpoints``...):
each component registers an ordered list of migration scripts with :meth:`Store.apply_schema`
and the store runs the ones not applied yet. Other parts add their own tables the same way.
"""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")

DB_NAME = "coordinator.sqlite3"

_CORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
);
"""

EVENTS_MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts      REAL NOT NULL,
        peer_id TEXT,
        kind    TEXT NOT NULL,
        detail  TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_ts ON events(ts);
    """,
)


class StoreError(Exception):
    """The data dir or database cannot be used (corrupt, unwritable, newer schema)."""


class Store:
    """The coordinator database under ``data_dir``; call :meth:`open` before use."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self._conn: sqlite3.Connection | None = None
        # One worker thread = the single writer; all reads go through it too (queries are tiny).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-db")

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Create/open the database; raise StoreError with a readable reason on failure."""
        try:
            # 0700/0600: the database holds invite secrets (coordinator/auth.py)
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create data dir {self.data_dir}: {e.strerror or e}") from e
        if not self.data_dir.is_dir():
            raise StoreError(f"data dir {self.data_dir} is not a directory")
        try:
            self.path.touch(mode=0o600, exist_ok=True)
            os.chmod(self.path, 0o600)  # SQLite gives its -wal and -shm files the same mode
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable against process crash in WAL mode
            conn.execute("PRAGMA busy_timeout=5000")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"database {self.path} is corrupt: {check}")
            conn.executescript(_CORE_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(f"cannot use database {self.path}: {e}") from e
        self._conn = conn
        self.apply_schema("events", EVENTS_MIGRATIONS)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    def apply_schema(self, component: str, migrations: Sequence[str]) -> int:
        """Run the migrations of ``component`` not applied yet; returns the resulting version."""
        conn = self.conn
        try:
            row = conn.execute("SELECT version FROM schema_versions WHERE component = ?",
                               (component,)).fetchone()
            current = row[0] if row else 0
            if current > len(migrations):
                raise StoreError(f"database {self.path} has {component} schema v{current}, "
                                 f"this coordinator knows only v{len(migrations)}; upgrade it")
            for version in range(current + 1, len(migrations) + 1):
                conn.executescript("BEGIN;" + migrations[version - 1] +
                                   f";INSERT OR REPLACE INTO schema_versions VALUES "
                                   f"('{component}', {version}); COMMIT;")
            return len(migrations)
        except sqlite3.DatabaseError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"cannot migrate {component} schema in {self.path}: {e}") from e

    # -- execution -------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the writer thread inside one transaction."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transaction, fn, args)

    def _transaction(self, fn: Callable[..., T], args: tuple) -> T:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result


def add_event(conn: sqlite3.Connection, kind: str, peer_id: str | None = None,
              detail: dict | None = None, ts: float | None = None) -> None:
    """Append one row to the event log (call inside :meth:`Store.run`)."""
    conn.execute("INSERT INTO events (ts, peer_id, kind, detail) VALUES (?, ?, ?, ?)",
                 (time.time() if ts is None else ts, peer_id, kind, json.dumps(detail or {})))


def recent_events(conn: sqlite3.Connection, limit: int = 50) -> list[dict]:
    rows = conn.execute("SELECT ts, peer_id, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                        (limit,)).fetchall()
    return [{"ts": r["ts"], "peer_id": r["peer_id"], "kind": r["kind"],
             "detail": json.loads(r["detail"])} for r in rows]
