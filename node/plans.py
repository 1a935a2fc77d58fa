"""Training-plan approval: the node runs a plan only if its admin approved that exact code.

A plan is identified by what it is, not by what it claims: the sha256 of its source text
(`zoo:NAME` for the built-in zoo plans, which the config may trust by default). A job whose
plan is unknown parks the plan here as *pending*, with its source, so the admin can read it
(`fbm-node plan show`) before approving or rejecting it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from common.messages import PlanRef
from common.training.loader import source_sha256
from node.db import Database


class PlanStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKED = "revoked"


def plan_id(ref: PlanRef) -> str:
    """The key a plan is approved under: its source's sha256, or `zoo:NAME`."""
    return f"zoo:{ref.zoo}" if ref.zoo is not None else str(ref.sha256)


@dataclass(frozen=True)
class StoredPlan:
    plan_id: str
    class_name: str
    source: str
    status: PlanStatus
    first_job: str
    first_sender: str
    seen_at: float
    decided_at: float | None
    decided_by: str
    note: str


class PlanStore:
    """The node's plan decisions, in its SQLite database (shared by the service and the CLI)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, pid: str) -> StoredPlan | None:
        rows = self.db.execute("SELECT * FROM plans WHERE plan_id = ?", (pid,))
        return _row(rows[0]) if rows else None

    def find(self, prefix: str) -> StoredPlan:
        """A plan by id or unambiguous id prefix (as an admin types it); KeyError says why not."""
        rows = self.db.execute("SELECT * FROM plans WHERE plan_id LIKE ? ORDER BY plan_id", (prefix.replace("%", "") + "%",))
        exact = [r for r in rows if r["plan_id"] == prefix]
        if exact:
            return _row(exact[0])
        if not rows:
            raise KeyError(f"no plan {prefix!r} on this node (see `fbm-node plan list`)")
        if len(rows) > 1:
            raise KeyError(f"{prefix!r} matches {len(rows)} plans; give more of the sha256")
        return _row(rows[0])

    def status(self, pid: str) -> PlanStatus | None:
        plan = self.get(pid)
        return plan.status if plan else None

    def list(self, status: PlanStatus | None = None) -> list[StoredPlan]:
        if status is None:
            rows = self.db.execute("SELECT * FROM plans ORDER BY seen_at")
        else:
            rows = self.db.execute("SELECT * FROM plans WHERE status = ? ORDER BY seen_at", (str(status),))
        return [_row(r) for r in rows]

    def record_seen(self, ref: PlanRef, job: str, sender: str) -> StoredPlan:
        """Remember a plan a job asked for (pending unless already decided); the stored plan."""
        pid = plan_id(ref)
        self.db.execute(
            "INSERT OR IGNORE INTO plans (plan_id, class_name, source, status, first_job, first_sender, seen_at, "
            "decided_by, note) VALUES (?, ?, ?, ?, ?, ?, ?, '', '')",
            (pid, ref.class_name or ref.zoo or "", ref.source or "", str(PlanStatus.PENDING), job, sender, time.time()),
        )
        stored = self.get(pid)
        assert stored is not None
        return stored

    def add_source(self, source: str, class_name: str, actor: str, note: str = "") -> StoredPlan:
        """Approve a plan ahead of any job, from the file the researcher shared."""
        ref = PlanRef(source=source, sha256=source_sha256(source), class_name=class_name)
        self.record_seen(ref, job="", sender=actor)
        return self.decide(plan_id(ref), PlanStatus.APPROVED, actor, note)

    def decide(self, pid: str, status: PlanStatus, actor: str, note: str = "") -> StoredPlan:
        if status == PlanStatus.PENDING:
            raise ValueError("a decision is approve, reject or revoke")
        plan = self.get(pid)
        if plan is None:
            if not pid.startswith("zoo:"):
                raise KeyError(f"no plan {pid!r} on this node")
            self.record_seen(PlanRef(zoo=pid.removeprefix("zoo:")), job="", sender=actor)
        self.db.execute("UPDATE plans SET status = ?, decided_at = ?, decided_by = ?, note = ? WHERE plan_id = ?",
                        (str(status), time.time(), actor, note, pid))
        stored = self.get(pid)
        assert stored is not None
        return stored


def _row(row: dict) -> StoredPlan:
    return StoredPlan(
        plan_id=row["plan_id"], class_name=row["class_name"], source=row["source"], status=PlanStatus(row["status"]),
        first_job=row["first_job"], first_sender=row["first_sender"], seen_at=row["seen_at"],
        decided_at=row["decided_at"], decided_by=row["decided_by"], note=row["note"],
    )
