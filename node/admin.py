"""The site admin's actions, shared by the CLI and the web console (one source of truth).

Each action changes the node's SQLite database and records who did it in the audit trail:
`admin:<os user>` from the CLI, `ui:<account>` from the web console.
"""

from __future__ import annotations

import ast
import getpass
from pathlib import Path

from node.audit import AuditTrail
from node.db import Database
from node.plans import PlanStatus, PlanStore, StoredPlan
from node.registry import Dataset, Registry


def os_admin() -> str:
    """Who ran an admin command, for the audit trail (the OS account)."""
    try:
        return f"admin:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "admin"


class AdminError(ValueError):
    """An admin action that cannot be done; the message says why and what to do."""


def add_dataset(db: Database, actor: str, name: str, kind: str, path: str | Path, tags: list[str], *,
                description: str = "", target: str | None = None, labels: str | Path | None = None) -> Dataset:
    """Register a dataset (read once now: a bad file is refused here, not mid-job).

    A path inside the node's own folder (its key, its database) is refused before anything
    is read: a dataset is what researchers' plans may read."""
    from node.datasets import DatasetError

    node_dir = db.path.parent.resolve()
    target_path = Path(path).expanduser().resolve()
    if target_path == node_dir or node_dir in target_path.parents:
        raise AdminError(f"dataset not added: {target_path} is inside this node's own folder ({node_dir}), "
                         "which holds its private key and database")
    try:
        ds = Registry(db).add(name, kind, path, tags, description=description, target=target or None,
                              labels=labels or None)
    except DatasetError as exc:
        raise AdminError(f"dataset not added: {exc}") from None
    AuditTrail(db).record("dataset_added", dataset=name, actor=actor, path=ds.path, type=kind)
    return ds


def remove_dataset(db: Database, actor: str, name: str) -> None:
    """Unregister a dataset (its files are left alone)."""
    if not Registry(db).remove(name):
        raise AdminError(f"no dataset named {name!r}")
    AuditTrail(db).record("dataset_removed", dataset=name, actor=actor)


def decide_plan(db: Database, actor: str, plan_id: str, status: PlanStatus, note: str = "") -> StoredPlan:
    """Approve, reject or revoke a plan given by id, unambiguous prefix or `zoo:NAME`."""
    store = PlanStore(db)
    try:
        pid = _zoo(plan_id) if plan_id.startswith("zoo:") else store.find(plan_id).plan_id
        plan = store.decide(pid, status, actor, note)
    except KeyError as exc:
        raise AdminError(str(exc.args[0])) from None
    AuditTrail(db).record(f"plan_{status}", plan_sha256=plan.plan_id, actor=actor, note=note)
    return plan


def approve_source(db: Database, actor: str, source: str, class_name: str, note: str = "",
                   origin: str = "") -> StoredPlan:
    """Approve a plan's source ahead of any job (its sha256 is what gets approved)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise AdminError(f"{origin or 'the plan'} is not valid Python: {exc}") from None
    if not any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body):
        raise AdminError(f"{origin or 'the plan'} defines no class {class_name!r}")
    plan = PlanStore(db).add_source(source, class_name, actor, note)
    AuditTrail(db).record("plan_approved", plan_sha256=plan.plan_id, actor=actor, note=note, file=origin)
    return plan


def _zoo(plan_id: str) -> str:
    from common.training.catalog import ZOO_ALGORITHMS as ZOO

    if plan_id.removeprefix("zoo:") not in ZOO:
        raise KeyError(f"unknown zoo plan {plan_id!r}; the zoo has: {', '.join('zoo:' + z for z in sorted(ZOO))}")
    return plan_id
