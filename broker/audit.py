"""The federation's audit trail (issue 18; the paper's "keep track of every request made,
shared data and the current available jobs"): an admin subscriber records the header of every
message on the broker in SQLite, never its content.

Each row: when it was seen, topic, type, message id, sender, job, owner, round, size, the
sha256 of the body, the signed timestamp, and whether the signature checked out (a message
that does not is recorded with the reason, so a forgery attempt is on the trail too).
`trail(job)` reads a job's messages from its submission to its last model.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from common import topics
from common.envelope import peek_header, verify_envelope
from common.errors import BadMessage
from common.identity import TrustStore

AUDITOR = "fbm-audit"  # the admin identity the recorder connects as


@dataclass(frozen=True)
class AuditRecord:
    at: float
    topic: str
    type: str
    msg_id: str
    sender: str
    job: str
    owner: str
    round: int | None
    size: int
    body_sha256: str
    ts: float | None
    status: str  # "ok", or why the message would be dropped (its reason)
    retained: bool


def record_of(topic: str, payload: bytes | bytearray | memoryview, retained: bool, trust: TrustStore,
              now: float) -> AuditRecord:
    """The header of one message as the trail keeps it (pure: no I/O); a cleared retained topic
    is recorded as type `clear`."""
    job, owner = topics.job_of(topic) or "", topics.owner_of(topic) or ""
    if not len(payload):
        return AuditRecord(now, topic, "clear", "", "", job, owner, None, 0, "", None, "ok", retained)
    try:
        checked = verify_envelope(payload, trust, topic)
        head, digest, status = checked.header, checked.body_sha256.hex(), "ok"
    except BadMessage as exc:
        try:
            head = peek_header(payload)
        except BadMessage:
            head = {}
        digest, status = "", str(exc.reason)
    rnd = head.get("round")
    return AuditRecord(now, topic, str(head.get("type", "?")), str(head.get("id", "")), str(head.get("sender", "")),
                       str(head.get("job") or job), owner, rnd if isinstance(rnd, int) else None, len(payload), digest,
                       float(head["ts"]) if isinstance(head.get("ts"), int | float) else None, status, retained)


_COLUMNS = [f.name for f in fields(AuditRecord)]


class AuditLog:
    """The trail in a SQLite file; a message seen twice (a retained copy on re-subscribing) is
    kept once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS messages (at REAL, topic TEXT, type TEXT, msg_id TEXT, sender TEXT, job TEXT,"
            " owner TEXT, round INTEGER, size INTEGER, body_sha256 TEXT, ts REAL, status TEXT, retained INTEGER)")
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS once ON messages (msg_id, topic) WHERE msg_id != ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_job ON messages (job, at)")
        self._lock = threading.Lock()

    def add(self, record: AuditRecord) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR IGNORE INTO messages ({', '.join(_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(_COLUMNS))})", astuple(record))

    def trail(self, job: str) -> list[AuditRecord]:
        """Every message about `job`, in the order they were seen."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM messages WHERE job = ? ORDER BY at, rowid",
                                    (job,)).fetchall()
        return [AuditRecord(*row[:-1], bool(row[-1])) for row in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM messages").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


EVENTS = {"job": "submitted", "withdraw": "withdrawn", "model": "model", "update": "update",
          "job_done": "end: done", "job_failed": "end: failed", "clear": "cleared"}


def describe(record: AuditRecord) -> str:
    """One trail line's label: what happened (submission, a round's model, an update, the end)."""
    label = EVENTS.get(record.type, record.type)
    return label if record.status == "ok" else f"{label} (dropped by receivers: {record.status})"


def run_recorder(log: AuditLog, identity_dir: Path, stop: threading.Event, settings=None) -> None:
    """Record every message on the broker until `stop` is set (the admin subscriber)."""
    from common.identity import Identity
    from common.settings import TransportSettings
    from common.transport import Delivery, Transport

    identity = Identity.load(identity_dir)
    trust = TrustStore(identity.ca_pem)

    def on_delivery(delivery: Delivery) -> None:
        log.add(record_of(delivery.topic, delivery.payload, delivery.retained, trust, time.time()))

    transport = Transport(identity, settings or TransportSettings(clean_start=False), client_id=f"{AUDITOR}:recorder",
                          on_delivery=on_delivery)
    transport.subscribe(f"{topics.PREFIX}/#", retained_chunks=False)
    transport.connect()
    try:
        stop.wait()
    finally:
        transport.close()
