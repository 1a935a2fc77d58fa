"""A node follows one aggregator per job, and keeps following it across a restart (attack 4)."""

from __future__ import annotations

import structlog

from node.audit import AuditTrail
from node.binding import JobBindings
from node.db import Database
from node.state import NodeState


def _bindings(path) -> tuple[JobBindings, AuditTrail]:
    db = Database(path)
    audit = AuditTrail(db)
    return JobBindings(NodeState(db), audit, structlog.get_logger("test")), audit


def _events(audit: AuditTrail, event: str) -> list[dict]:
    return [e for e in audit.entries() if e["event"] == event]


def test_the_first_aggregator_is_bound_and_the_binding_survives_a_restart(tmp_path):
    node, audit = _bindings(tmp_path / "node.db")
    assert node.accepts("job-1", None, "agg-1", "model")
    assert not node.accepts("job-1", None, "agg-rogue", "model")
    assert not node.accepts("job-1", None, "agg-rogue", "update_received")
    assert node.accepts("job-1", None, "agg-1", "update_received")
    # restarted: the first message it sees is the rogue's retained model; the database says agg-1
    restarted, audit = _bindings(tmp_path / "node.db")
    assert restarted.bound("job-1") == "agg-1"
    assert not restarted.accepts("job-1", None, "agg-rogue", "model")
    assert restarted.accepts("job-1", None, "agg-1", "model")
    assert [e["actor"] for e in _events(audit, "job_aggregator_bound")] == ["agg-1"]


def test_a_pinned_aggregator_is_the_only_one_even_if_another_speaks_first(tmp_path):
    node, _ = _bindings(tmp_path / "node.db")
    assert not node.accepts("job-2", "agg-2", "agg-1", "model")
    assert node.accepts("job-2", "agg-2", "agg-2", "model")
    assert node.bound("job-2") is None  # a pinned job needs no record


def test_a_flood_of_foreign_messages_is_audited_once_per_job_sender_and_type(tmp_path):
    node, audit = _bindings(tmp_path / "node.db")
    node.accepts("job-3", None, "agg-1", "model")
    for _ in range(50):
        node.accepts("job-3", None, "agg-rogue", "model")
        node.accepts("job-3", None, "agg-rogue", "update_received")
    dropped = _events(audit, "foreign_aggregator_dropped")
    assert sorted(e["detail"]["type"] for e in dropped) == ["model", "update_received"]
    assert all("bound to aggregator 'agg-1'" in e["detail"]["reason"] for e in dropped)


def _claim_msg(job: str, sender: str, **body):
    from types import SimpleNamespace

    from common.messages import JobClaim

    return SimpleNamespace(sender=sender, body=JobClaim(job=job, **body))


def test_a_takeover_rebinds_only_after_the_bound_lease_lapsed_and_a_renewing_holder_stays(tmp_path):
    import time

    node, audit = _bindings(tmp_path / "node.db")
    now = time.time()
    node.on_claim(_claim_msg("job-4", "agg-1", epoch=1, state="held", since=now - 60, lease_until=now + 20, issued=now))
    assert node.accepts("job-4", None, "agg-1", "model")
    # agg-rogue claims a later epoch while agg-1's lease runs: refused (attack 4 stays stopped)
    node.on_claim(_claim_msg("job-4", "agg-rogue", epoch=2, state="held", since=now, lease_until=now + 30, issued=now,
                             previous="agg-1"))
    assert not node.accepts("job-4", None, "agg-rogue", "model")
    # agg-1 gone: its newest claim lapsed before agg-2 bid
    node.on_claim(_claim_msg("job-4", "agg-1", epoch=1, state="held", since=now - 60, lease_until=now - 10,
                             issued=now + 1))  # (a stale copy: older `issued` would be ignored)
    node.on_claim(_claim_msg("job-4", "agg-2", epoch=2, state="held", since=now - 5, lease_until=now + 25,
                             issued=now - 5, previous="agg-1"))
    assert node.accepts("job-4", None, "agg-2", "update_received")
    assert not node.accepts("job-4", None, "agg-1", "model")  # a zombie of the old holder is refused now
    assert _bindings(tmp_path / "node.db")[0].bound("job-4") == "agg-2"
    assert [e["actor"] for e in _events(audit, "job_aggregator_rebound")] == ["agg-2"]
    assert not node.accepts("job-5", "agg-1", "agg-2", "model")  # pinned jobs are never taken over


def test_updates_are_sealed_for_the_aggregator_bound_at_each_send_not_at_the_jobs_start(tmp_path):
    """Issue 18: the recipients of a job's updates are a lookup. When the binding moves (an
    aggregator taking the job over), the next re-send goes to the new one."""
    node, _ = _bindings(tmp_path / "node.db")
    assert node.update_recipients("job-3", None) == []  # bound to nobody yet: nothing is sent
    assert node.accepts("job-3", None, "agg-1", "model")
    assert node.update_recipients("job-3", None) == ["agg-1"]
    node._bound["job-3"] = "agg-2"  # what a failover does to the binding (another helper's work)
    assert node.update_recipients("job-3", None) == ["agg-2"]
    assert node.update_recipients("job-4", "agg-9") == ["agg-9"]  # pinned
