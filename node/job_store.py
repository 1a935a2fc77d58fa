"""The jobs this node took (accepted, or parked until its admin decides on the plan), kept in
its database as the researcher's signed job message, verbatim.

A restarted node resumes them from here instead of waiting for the retained job on the
broker: a hard-killed broker loses retained messages newer than its last autosave, and the
researcher may be offline for days. The signature is checked again when a job is resumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from node.db import Database

JobState = Literal["accepted", "parked"]


@dataclass(frozen=True)
class StoredJob:
    job_id: str
    state: JobState
    dataset: str
    sender: str
    wire: bytes


class JobStore:
    """One row per job the node still serves; removed when the job ends or is withdrawn."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def keep(self, job_id: str, state: JobState, dataset: str, sender: str, wire: bytes | bytearray | memoryview) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO jobs (job_id, state, dataset, sender, wire, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, state, dataset, sender, bytes(wire), time.time()))

    def forget(self, job_id: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def all(self) -> list[StoredJob]:
        rows = self.db.execute("SELECT job_id, state, dataset, sender, wire FROM jobs ORDER BY updated_at")
        return [StoredJob(r["job_id"], r["state"], r["dataset"], r["sender"], bytes(r["wire"])) for r in rows]
