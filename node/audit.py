"""The node's audit trail: every job seen, accepted or refused (and why), every round trained."""

from __future__ import annotations

import json
import time
from typing import Any

from node.db import Database


class AuditTrail:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, event: str, *, job: str | None = None, round_: int | None = None,
               dataset: str | None = None, plan_sha256: str | None = None, actor: str | None = None,
               **detail: Any) -> None:
        self.db.execute(
            "INSERT INTO audit (ts, event, job, round, dataset, plan_sha256, actor, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), event, job, round_, dataset, plan_sha256, actor, json.dumps(detail, default=str)),
        )

    def entries(self, job: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if job:
            rows = self.db.execute("SELECT * FROM audit WHERE job = ? ORDER BY id DESC LIMIT ?", (job, limit))
        else:
            rows = self.db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows
