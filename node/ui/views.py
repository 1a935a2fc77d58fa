"""What the console's pages show, computed from the node's own records (pure where possible).

Jobs are read back from the audit trail the node process writes; datasets are previewed from
their files; the file picker lists folders of the node's filesystem.
"""

from __future__ import annotations

import base64
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# audit events that settle what the node did with a job, latest wins
_JOB_STATES = {
    "job_accepted": "accepted", "job_pending": "pending", "job_refused": "refused",
    "job_not_selected": "not selected", "job_withdrawn": "withdrawn", "job_done": "done", "job_failed": "failed",
}


@dataclass
class RoundRow:
    round: int
    ok: bool
    at: float
    train_s: float | None = None
    n_samples: int | None = None
    error: str = ""


@dataclass
class JobSummary:
    job: str
    first_seen: float
    last_seen: float
    state: str = "seen"
    reason: str = ""
    dataset: str = ""
    plan: str = ""
    researcher: str = ""
    rounds: list[RoundRow] = field(default_factory=list)

    @property
    def trained(self) -> int:
        return sum(r.ok for r in self.rounds)

    @property
    def train_s(self) -> float:
        return sum(r.train_s or 0.0 for r in self.rounds)


def summarize_jobs(entries: list[dict[str, Any]]) -> list[JobSummary]:
    """One summary per job from audit entries (any order): state, reason, rounds and timings."""
    jobs: dict[str, JobSummary] = {}
    for e in sorted(entries, key=lambda e: (e["ts"], e.get("id", 0))):
        job = e.get("job")
        if not job:
            continue
        s = jobs.setdefault(job, JobSummary(job=job, first_seen=e["ts"], last_seen=e["ts"]))
        s.last_seen = e["ts"]
        detail = e.get("detail") or {}
        event = e["event"]
        if event in _JOB_STATES:
            s.state = _JOB_STATES[event]
            s.reason = str(detail.get("reason") or detail.get("error") or "")
        if event in ("job_accepted", "job_pending") and e.get("actor"):
            s.researcher = e["actor"]
        s.dataset = e.get("dataset") or s.dataset
        s.plan = e.get("plan_sha256") or s.plan
        if event == "round_trained":
            s.rounds.append(RoundRow(e["round"], True, e["ts"], detail.get("train_s"), detail.get("n_samples")))
        elif event == "round_failed":
            s.rounds.append(RoundRow(e["round"] or 0, False, e["ts"], error=str(detail.get("error", ""))))
    return sorted(jobs.values(), key=lambda s: s.last_seen, reverse=True)


@dataclass
class DatasetPrivacy:
    """What the steward sees of a dataset's privacy: the policy in force, the budget and its spend."""

    policy: dict[str, Any]
    budget: float | None
    spent: float
    jobs: list[dict[str, Any]]
    queries_today: int
    max_queries: int

    @property
    def left(self) -> float | None:
        return None if self.budget is None else max(self.budget - self.spent, 0.0)


def dataset_privacy(settings: Any, db: Any, name: str) -> DatasetPrivacy:
    """The effective policy (per-dataset overrides applied) and the ledger's rows for `name`."""
    from node.privacy_budget import PrivacyLedger, QueryLedger

    policy = settings.privacy.for_dataset(name)
    ledger = PrivacyLedger(db)
    return DatasetPrivacy(policy=policy.model_dump(exclude={"datasets"}), budget=policy.epsilon_budget,
                          spent=ledger.spent(name).epsilon, jobs=ledger.jobs(name),
                          queries_today=QueryLedger(db).in_last_day(name), max_queries=settings.statistics.max_queries)


@dataclass
class Preview:
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # data: URIs of PNGs
    labels: list[str] = field(default_factory=list)
    error: str = ""


def preview(kind: str, path: str, *, target: str | None = None, labels: str | None = None, n: int = 8) -> Preview:
    """The first rows of a table, or the first images of an image set, for a human to eyeball."""
    try:
        if kind == "csv":
            with open(path, newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, [])
                rows = [row for _, row in zip(range(n), reader, strict=False)]
            return Preview(columns=header, rows=rows)
        from node.datasets import load

        data = load(kind, path, target=target, labels=labels)
    except Exception as exc:  # noqa: BLE001 - the page says why instead of failing
        return Preview(error=str(exc))
    x = data.x[:n]
    names = [str(int(v)) for v in data.y[:n]] if data.y is not None else []
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return Preview(images=[_png(img) for img in x], labels=names)
    flat = x.reshape(len(x), -1)[:, :12]
    return Preview(columns=[f"x[{i}]" for i in range(flat.shape[1])] + (["label"] if names else []),
                   rows=[[f"{v:.4g}" for v in row.tolist()] + ([names[i]] if names else []) for i, row in enumerate(flat)])


def _png(image) -> str:
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    pic = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if pic.width < 96:
        pic = pic.resize((pic.width * 3, pic.height * 3), Image.NEAREST)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Listing:
    path: str
    parent: str | None
    dirs: list[str]
    files: list[str]
    error: str = ""


def browse(path: str | None, start: Path, limit: int = 500) -> Listing:
    """The folders and files in `path` (names only; hidden ones skipped), for the file picker."""
    where = Path(path or start).expanduser()
    try:
        where = where.resolve(strict=True)
        if not where.is_dir():
            where = where.parent
        entries = sorted(os.scandir(where), key=lambda d: d.name.lower())
    except OSError as exc:
        return Listing(str(where), None, [], [], error=f"cannot list {where}: {exc.strerror or exc}")
    dirs = [e.name for e in entries if not e.name.startswith(".") and _is_dir(e)][:limit]
    files = [e.name for e in entries if not e.name.startswith(".") and not _is_dir(e)][:limit]
    parent = str(where.parent) if where.parent != where else None
    return Listing(str(where), parent, dirs, files)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
