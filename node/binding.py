"""Which aggregator each job is bound to, so a node follows that one only (issue 17, attack 4).

Any aggregator identity may write any job's model topic and any node's requests topic (the
ACL cannot tell jobs apart), so a node checks each model and acknowledgement itself. The rule:

- the job's `aggregator.identity`, when the researcher pinned one;
- else the aggregator whose model for the job this node took first (trust on first use),
  persisted in the node's database: a restarted node keeps it, and is not misled by another
  aggregator's retained model published meanwhile;
- re-bound to another aggregator only by a take-over (docs/design.md, "Aggregators as a
  fleet"): its signed claim holds the job in a later epoch, bid after the lease of the bound
  aggregator's newest claim had run out (common/claims.py `valid_takeover`). A holder that
  renews its lease cannot be displaced this way.

Anything else is logged, audited (once per job, sender and type: a flood does not fill the
audit trail) and dropped.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from common.claims import SKEW_S, newer, valid_takeover
from common.envelope import Message
from common.messages import JobClaim
from node.audit import AuditTrail
from node.state import NodeState

KEY = "job_aggregator:"


class JobBindings:
    def __init__(self, state: NodeState, audit: AuditTrail, log: Any) -> None:
        self.state = state
        self.audit = audit
        self.log = log
        self._bound: dict[str, str] = {}
        self._audited: set[tuple[str, str, str]] = set()
        self._claims: dict[tuple[str, str], JobClaim] = {}  # (job, aggregator) -> its newest claim
        self._lock = threading.Lock()

    def on_claim(self, msg: Message) -> None:
        """Keep each aggregator's newest claim per job (a take-over is checked against them)."""
        claim: JobClaim = msg.body  # type: ignore[assignment]
        key = (claim.job, msg.sender)
        with self._lock:
            if newer(self._claims.get(key), claim):
                self._claims[key] = claim

    def _rebind(self, job: str, bound: str, sender: str) -> bool:
        """Follow `sender` instead of `bound` if it took the job over (persisted, audited)."""
        with self._lock:
            old, new = self._claims.get((job, bound)), self._claims.get((job, sender))
        why_not = "it made no claim on the job" if new is None else valid_takeover(old, new, time.time(), SKEW_S)
        if why_not is not None:
            return False
        with self._lock:
            self._bound[job] = sender
        self.state.put(KEY + job, sender)
        self.audit.record("job_aggregator_rebound", job=job, actor=sender, previous=bound, epoch=new.epoch)  # type: ignore[union-attr]
        self.log.info("job_aggregator_rebound", job=job, aggregator=sender, previous=bound, epoch=new.epoch)  # type: ignore[union-attr]
        return True

    def bound(self, job: str) -> str | None:
        """The aggregator the job is bound to, if any yet (from memory, else the database)."""
        with self._lock:
            if job in self._bound:
                return self._bound[job]
        stored = self.state.get(KEY + job)  # bound before this node restarted
        if stored is None:
            return None
        with self._lock:
            return self._bound.setdefault(job, str(stored[0]))

    def _bind(self, job: str, aggregator: str) -> str:
        """Bind the job to the first aggregator seen serving it (persisted; the first wins)."""
        with self._lock:
            bound = self._bound.setdefault(job, aggregator)
        if bound == aggregator:
            self.state.put(KEY + job, aggregator)
            self.audit.record("job_aggregator_bound", job=job, actor=aggregator)
            self.log.info("job_aggregator_bound", job=job, aggregator=aggregator)
        return bound

    def update_recipients(self, job: str, pinned: str | None) -> list[str]:
        """Who this node's updates of `job` are sealed for (common/sealed.py): the aggregator the
        job is bound to NOW, looked up at every send (and re-send), never kept from the job's
        start: an aggregator that takes the job over is the one its re-sent updates go to."""
        bound = pinned or self.bound(job)
        return [bound] if bound else []

    def accepts(self, job: str, pinned: str | None, sender: str, type_: str) -> bool:
        """Whether a `type_` message for `job` from aggregator `sender` is to be taken."""
        bound = pinned or self.bound(job) or self._bind(job, sender)
        if sender == bound or (pinned is None and self._rebind(job, bound, sender)):
            return True
        reason = f"job {job} is bound to aggregator {bound!r}, not {sender!r}"
        self.log.warning("foreign_aggregator_dropped", job=job, type=type_, sender=sender, bound=bound, reason=reason)
        with self._lock:
            first = (job, sender, type_) not in self._audited
            self._audited.add((job, sender, type_))
        if first:
            self.audit.record("foreign_aggregator_dropped", job=job, actor=sender, type=type_, reason=reason)
        return False
