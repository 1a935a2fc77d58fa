"""Replay defence (issue 18): a message's signed timestamp against a window, and the ids of the
messages already processed, remembered across restarts.

`freshness` is the pure decision; `SeenIds` the memory: in the process only (researcher tools,
which keep no state) or also in a SQLite file (nodes and aggregators), so that a message
captured before a restart and published again after it is dropped as a replay.

A retained message the broker hands over when we subscribe is the broker's current state, not
a replay: its age is not checked (a job submitted a month ago is still the job) and only this
process's memory dedupes it (after a restart the node must see the retained model again to
rejoin the open round). A retained message re-published by someone reaches the subscribers
already connected as a live message, and is checked like one. A node's status is not checked
for age either: its offline status is its Last Will, sealed when it connected.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from common.errors import BadMessage, Reason


def freshness(ts: float, now: float, *, retained: bool, max_age_s: float, max_skew_s: float) -> BadMessage | None:
    """Why a message signed at `ts` must be dropped at `now`, or None if it may be processed."""
    if retained:
        return None
    if ts > now + max_skew_s:
        return BadMessage(Reason.STALE, f"signed {ts - now:.0f}s in the future (clock skew allowed: {max_skew_s:.0f}s)")
    if now - ts > max_age_s:
        return BadMessage(Reason.STALE, f"signed {now - ts:.0f}s ago (a live message may be at most {max_age_s:.0f}s old)")
    return None


class SeenIds:
    """The ids of processed messages: the last `window` in memory, and, with a `path`, every id
    of the last `keep_s` seconds in a SQLite file that survives a restart."""

    def __init__(self, window: int, path: Path | None = None, keep_s: float = 8 * 24 * 3600.0) -> None:
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._window = window
        self._keep_s = keep_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._last_prune = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (msg_id TEXT PRIMARY KEY, at REAL NOT NULL)")

    @property
    def persistent(self) -> bool:
        return self._db is not None

    def in_process(self, msg_id: str) -> bool:
        """Seen by this process (duplicates of QoS 1 and overlapping subscriptions)."""
        with self._lock:
            return msg_id in self._recent

    def ever(self, msg_id: str) -> bool:
        """Seen by this process or, with a file, before a restart."""
        if self.in_process(msg_id):
            return True
        if self._db is None:
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM seen WHERE msg_id = ?", (msg_id,)).fetchone() is not None

    def remember(self, msg_id: str, *, persist: bool = True) -> None:
        """Remember `msg_id`; with `persist`, also across a restart (only for a message whose
        effect is durable once its handler returned)."""
        now = time.time()
        with self._lock:
            self._recent[msg_id] = None
            if len(self._recent) > self._window:
                self._recent.popitem(last=False)
            if self._db is None or not persist:
                return
            self._db.execute("INSERT OR REPLACE INTO seen (msg_id, at) VALUES (?, ?)", (msg_id, now))
            if now - self._last_prune > 600:
                self._db.execute("DELETE FROM seen WHERE at < ?", (now - self._keep_s,))
                self._last_prune = now

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
