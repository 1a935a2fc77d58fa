"""One round's decisions as a pure state machine: who is expected, whose update is folded,
when to make the round durable and acknowledge, when it closes or fails.

In the shape of etcd's raft: events go in (`on_update`, `on_folded`, `on_join`, `on_dropout`,
`on_tick(now)`), an ordered list of actions comes out, and the caller (JobRunner) performs them
in order: fold an update into the rule, checkpoint the open round, acknowledge, close, fail.
No clock, no queue, no I/O here: every time is an argument, so tests drive whole rounds with a
fake clock. Persist-before-ack is the order of the actions: `SaveOpen` always comes before the
`Ack`s of the updates it makes durable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

CHECKPOINT_EVERY_S = 0.5  # with updates arriving, at most this long between open-round checkpoints
CHECKPOINT_EVERY_N = 256  # ... or this many folded updates
LULL_S = 0.1  # no event for this long: make what was folded durable at once

DropKind = Literal["offline", "failed", "declined", "pending"]


@dataclass(frozen=True)
class Fold:
    """Decode, check and fold this update into the rule; then call `on_folded` or `on_fold_failed`."""

    node: str


@dataclass(frozen=True)
class SaveOpen:
    """Checkpoint the open round (its state and the rule's partial sums)."""


@dataclass(frozen=True)
class Ack:
    """Tell the node its update of this round is held (it stops re-sending)."""

    node: str


@dataclass(frozen=True)
class Drop:
    """An update not taken (late, duplicate of a refused one, not of this round's nodes)."""

    node: str
    reason: str


@dataclass(frozen=True)
class Close:
    """The round is complete: end the rule's round, publish the new model."""


@dataclass(frozen=True)
class Fail:
    reason: str


Action = Fold | SaveOpen | Ack | Drop | Close | Fail


@dataclass(frozen=True)
class Policy:
    """The job's round policy, as the round reads it."""

    quorum: int
    stragglers: Literal["wait", "quorum"] = "wait"
    selective: bool = False  # only the drawn nodes may take part (selection `fraction`)


@dataclass(frozen=True)
class Standing:
    """What the job knows of a node beyond this round (the caller keeps it across rounds)."""

    eligible: bool = True  # online, in the job's nodes, holding a dataset with its tags
    declined: bool = False
    pending: bool = False  # its admin has not approved the plan yet


@dataclass
class Round:
    """The open round. `to_dict`/`from_dict` are its checkpoint (with the rule's state beside)."""

    round: int
    opened: float
    deadline: float
    policy: Policy
    expected: list[str]
    eligible: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)  # in folding order
    gone: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # gone because their training or update failed
    rejected: dict[str, str] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    unsaved: list[str] = field(default_factory=list)  # folded, not yet durable, so not yet acknowledged
    last_save: float = 0.0
    last_event: float = 0.0
    ended: bool = False
    # membership of `expected` and `answered` in O(1): with 10,000 nodes, list scans per update
    # made a round O(N^2) (issue 21); the lists keep their order, the sets follow them
    _expected_set: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    _answered_set: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._expected_set = set(self.expected)
        self._answered_set = set(self.answered)

    def is_expected(self, node: str) -> bool:
        return node in self._expected_set

    def _expect(self, node: str) -> None:
        if node not in self._expected_set:
            self._expected_set.add(node)
            self.expected.append(node)

    # --- events -------------------------------------------------------------------------------

    def on_update(self, node: str, update_round: int, standing: Standing) -> list[Action]:
        """An update arrived: fold it, acknowledge it again (a duplicate), or drop it."""
        if self.ended:
            return [Drop(node, "the round has ended")]
        if update_round != self.round:
            return [Drop(node, f"update for round {update_round}, round {self.round} is open")]
        if node in self._answered_set:
            return [Ack(node)] if node not in self.unsaved else []  # its first acknowledgement may be lost
        if node in self.rejected:
            return [Drop(node, "an earlier update of the round was rejected")]
        refusal = self._admission(node, standing)
        if refusal is not None:
            return self.on_fold_failed(node, refusal)
        self._expect(node)  # eligible now: it joins the round (all / at_least)
        return [Fold(node)]

    def on_folded(self, node: str, report: dict[str, Any], now: float) -> list[Action]:
        """The rule holds the update: count it; checkpoint and acknowledge when a batch is due."""
        self.answered.append(node)
        self._answered_set.add(node)
        self.gone.discard(node)
        self.reports.append(report)
        self.unsaved.append(node)
        self.last_event = now
        due = len(self.unsaved) >= CHECKPOINT_EVERY_N or now - self.last_save >= CHECKPOINT_EVERY_S
        return self._flush(now) if due else []

    def on_fold_failed(self, node: str, reason: str) -> list[Action]:
        """The update was refused: the node is out of this round, not waited for again."""
        self.rejected.setdefault(node, reason)
        if node in self._expected_set:
            self.gone.add(node)
            self.failed.add(node)
        return [Drop(node, reason)]

    def on_join(self, node: str, standing: Standing) -> list[Action]:
        """A node came (back) online or its plan was approved: it joins the open round."""
        if self.ended or standing.pending or standing.declined or (self.policy.selective and node not in self._expected_set):
            return []
        if node in self._answered_set or node in self.rejected:
            return []
        self.gone.discard(node)
        self.failed.discard(node)
        self._expect(node)
        return []

    def on_dropout(self, node: str, kind: DropKind) -> list[Action]:
        """A node left the round: offline (may come back), or its training failed, or it
        declined the job or waits for its plan's approval."""
        if node in self._expected_set and node not in self._answered_set:
            self.gone.add(node)
            if kind in ("failed", "declined"):
                self.failed.add(node)
        return []

    def on_tick(self, now: float) -> list[Action]:
        """Time passed: flush after a lull, close when complete, close or fail at the deadline."""
        if self.ended:
            return []
        if self.complete() or now >= self.deadline:
            self.ended = True
            actions = self._flush(now)
            if len(self.answered) < self.policy.quorum:
                return actions + [Fail(self._shortfall(now))]
            return actions + [Close()]
        if self.unsaved and now - self.last_event >= LULL_S:
            return self._flush(now)
        return []

    def on_secure_sum(self, included: list[str], dropped: list[str], report: dict[str, Any]) -> list[Action]:
        """A secure round ended with the sum of `included` (aggregators/secagg.py): that sum is
        the round's one update, already folded; the round closes."""
        if self.ended:
            return []
        self.ended = True
        self.answered = sorted(set(included))  # each site once: the sum holds each input at most once
        self._answered_set = set(self.answered)
        self.gone = set(dropped) - set(self.answered)
        self.reports = [report]
        return [Close()]

    # --- decisions ----------------------------------------------------------------------------

    def _shortfall(self, now: float) -> str:
        """Why the round failed, in words a researcher can act on."""
        got = f"round {self.round}: {len(self.answered)} update(s)"
        if now >= self.deadline:
            return f"{got} by the deadline, quorum is {self.policy.quorum}"
        out = sorted(set(self.expected) - set(self.answered))
        return (f"{got}, quorum is {self.policy.quorum}, and no node is left to wait for: "
                f"{', '.join(out)} declined the job or failed (their reasons are in the job's events)")

    def complete(self) -> bool:
        """Enough updates and nobody left worth waiting for (or stragglers need not be waited)."""
        if len(self._expected_set) > len(self._answered_set) + len(self.gone):  # someone is surely awaited: O(1)
            return len(self.answered) >= self.policy.quorum and self.policy.stragglers == "quorum"
        waiting = set(self.expected) - set(self.answered) - self.gone
        if len(self.answered) >= self.policy.quorum and (not waiting or self.policy.stragglers == "quorum"):
            return True
        # every node that could still answer failed: waiting for the deadline changes nothing
        return not waiting and bool(self.expected) and set(self.expected) - set(self.answered) <= self.failed

    def next_wakeup(self, now: float) -> float:
        """How long the caller may wait for the next event before calling `on_tick`."""
        return max(0.0, min(self.deadline - now, LULL_S if self.unsaved else 0.5))

    def missing(self) -> list[str]:
        return sorted(set(self.expected) - set(self.answered))

    def _admission(self, node: str, standing: Standing) -> str | None:
        """Why `node`'s update may not be folded (None if it may): only the round's nodes, or,
        unless the selection draws a subset, nodes eligible now (they join the round)."""
        if node in self._expected_set:
            return None
        if self.policy.selective:
            return "not selected for this round"
        if standing.declined or standing.pending:
            return "not selected for this round: it declined the job or its plan awaits approval"
        if not standing.eligible:
            return ("not selected for this round: not eligible for the job (offline, outside its nodes, "
                    "or no dataset with its tags)")
        return None

    def _flush(self, now: float) -> list[Action]:
        if not self.unsaved:
            return []
        actions: list[Action] = [SaveOpen(), *(Ack(n) for n in self.unsaved)]
        self.unsaved = []
        self.last_save = now
        return actions

    # --- checkpoint ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "opened": self.opened, "deadline": self.deadline,
                "expected": list(self.expected), "eligible": list(self.eligible), "answered": list(self.answered),
                "gone": sorted(self.gone), "failed": sorted(self.failed), "rejected": dict(self.rejected),
                "reports": list(self.reports)}

    @classmethod
    def from_dict(cls, state: dict[str, Any], policy: Policy, now: float) -> Round:
        """A round resumed from its checkpoint (what it held is durable: nothing unsaved)."""
        return cls(round=int(state["round"]), opened=float(state["opened"]), deadline=float(state["deadline"]),
                   policy=policy, expected=list(state["expected"]), eligible=list(state.get("eligible", [])),
                   answered=list(state["answered"]), gone=set(state["gone"]), failed=set(state.get("failed", [])),
                   rejected=dict(state.get("rejected") or {}), reports=list(state["reports"]),
                   last_save=now, last_event=now)
