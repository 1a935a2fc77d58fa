"""Each dataset's privacy spend, job by job, in the node's database: jobs on one dataset add up
(basic composition of their (epsilon, delta) guarantees), and a job that would take the total
over the dataset's budget is declined before it trains."""

from __future__ import annotations

import time
from dataclasses import dataclass

from node.db import Database


@dataclass(frozen=True)
class Spend:
    epsilon: float
    delta: float
    jobs: int


class PrivacyLedger:
    """Reserved when a job is accepted (it may train every round it asked for)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def spent(self, dataset: str) -> Spend:
        rows = self.db.execute("SELECT COALESCE(SUM(epsilon), 0) AS e, COALESCE(SUM(delta), 0) AS d, COUNT(*) AS n "
                               "FROM privacy_spend WHERE dataset = ?", (dataset,))
        return Spend(float(rows[0]["e"]), float(rows[0]["d"]), int(rows[0]["n"]))

    def reserve(self, dataset: str, job: str, epsilon: float, delta: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO privacy_spend (dataset, job, epsilon, delta, ts) VALUES (?, ?, ?, ?, ?)",
                        (dataset, job, epsilon, delta, time.time()))

    def jobs(self, dataset: str) -> list[dict]:
        """The jobs that spent the dataset's budget, latest first (for the console)."""
        return self.db.execute("SELECT job, epsilon, delta, ts FROM privacy_spend WHERE dataset = ? ORDER BY ts DESC",
                               (dataset,))

    def by_job(self) -> dict[str, float]:
        """Each job's epsilon, over every dataset it spent on."""
        rows = self.db.execute("SELECT job, SUM(epsilon) AS e FROM privacy_spend GROUP BY job")
        return {str(r["job"]): float(r["e"]) for r in rows}

    def of_job(self, dataset: str, job: str) -> float | None:
        rows = self.db.execute("SELECT epsilon FROM privacy_spend WHERE dataset = ? AND job = ?", (dataset, job))
        return float(rows[0]["epsilon"]) if rows else None


DAY_S = 24 * 3600.0


class QueryLedger:
    """Statistics answered per dataset: each answer reveals something about the same patients,
    so a dataset answers at most `max_queries` in any 24 hours (StatisticsPolicy)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def in_last_day(self, dataset: str, now: float | None = None) -> int:
        since = (time.time() if now is None else now) - DAY_S
        rows = self.db.execute("SELECT COUNT(*) AS n FROM statistics_queries WHERE dataset = ? AND ts > ?",
                               (dataset, since))
        return int(rows[0]["n"])

    def record(self, dataset: str, actor: str) -> None:
        self.db.execute("INSERT INTO statistics_queries (dataset, actor, ts) VALUES (?, ?, ?)",
                        (dataset, actor, time.time()))
