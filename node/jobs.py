"""The site's decisions on jobs as a pure object: which job to take, which round to train, which
update to send again (issue 16).

In the shape of `aggregators/round.py` (and etcd's raft): an event goes in (`on_job`,
`on_model`, `on_ack`, `on_plan_decision`, `on_withdrawn`, `due_resends(now)`), the state
changes, and an ordered list of actions comes out, which the caller performs in order: persist,
reply, audit, queue a round for training, send. No clock, no broker, no database writes here:
every time is an argument, and what the site must look up to decide (the checks of the job
against its code and caps, its datasets, its privacy policy and budget, its admin's decision on
a plan) comes through `Lookups`, read-only. `tests/unit/test_site_jobs.py` drives it with a
fake clock.

Not thread-safe: the caller takes one step at a time (NodeService under its lock, the simulated
fleet on its one loop thread) and performs the actions after the step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from common import topics
from common.envelope import Message
from common.messages import JobSpec, is_selective
from node.plans import PlanStatus, plan_id

if TYPE_CHECKING:
    from node.registry import Dataset

EARLY_MODELS = 4  # models of not-yet-known jobs held until their job arrives (latest per job)


@dataclass
class Job:
    """An accepted job. `trained` is the decisions' state; the rest is the training thread's
    memory of the job, which no decision reads."""

    spec: JobSpec
    dataset: Dataset
    trained: set[int] = field(default_factory=set)
    last_send_s: float = 0.0
    # what the local algorithm keeps between rounds (SCAFFOLD's c_i, ADMM's x_i and u_i);
    # in memory: a restarted node starts these afresh, which both algorithms tolerate
    local_state: dict[str, Any] = field(default_factory=dict)
    residual: dict[str, Any] = field(default_factory=dict)  # what update compression dropped (error feedback)


@dataclass
class Parked:
    """A job waiting for its plan's approval; the latest model is kept so it can join at once."""

    spec: JobSpec
    dataset: Dataset
    sender: str
    msg_id: str
    model: Message | None = None
    wire: bytes | bytearray | memoryview = b""


@dataclass(frozen=True)
class Pending:
    """An update sent but not yet acknowledged by the aggregator: re-sent until it is."""

    job: str
    round: int
    body: dict[str, Any]
    msg_id: str
    sent_at: float
    owner: str = ""  # the job's owner: its topics live under that name


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """Keep the job (persisted as `accepted`), reserve its privacy spend, tell the researcher."""

    spec: JobSpec
    dataset: Dataset
    sender: str
    msg_id: str
    wire: bytes | bytearray | memoryview = b""


@dataclass(frozen=True)
class Park:
    """Keep the job (persisted as `parked`) until the admin decides on its plan; say it waits."""

    parked: Parked


@dataclass(frozen=True)
class Decline:
    """Refuse the job and say why (to the message's sender, if it came in one)."""

    job: str
    reason: str
    sender: str | None = None
    msg_id: str = ""
    owner: str = ""  # the job's owner: the refusal is addressed to it


@dataclass(frozen=True)
class Record:
    """An audit event about the job (also logged)."""

    event: str
    job: str
    actor: str | None = None


@dataclass(frozen=True)
class Forget:
    """Remove the job from the node's database (its kept signed message); if said, also drop
    its secure-aggregation rounds and held states, and end its training process."""

    job: str
    secure: bool = False
    training: bool = False
    ended: str = ""  # done / failed / withdrawn: the shell remembers the job ended here


@dataclass(frozen=True)
class PublishStatus:
    """The node's list of jobs changed: publish its status again."""


@dataclass(frozen=True)
class Replay:
    """Handle this held model again, now that its job is accepted (binding check included)."""

    msg: Message


@dataclass(frozen=True)
class Train:
    """Train round `round` of `job` from `params` (the model received at `received_at`)."""

    job: str
    round: int
    params: dict[str, Any]
    received_at: float
    extra: dict[str, Any]


@dataclass(frozen=True)
class Resend:
    """Send this unacknowledged update again (same message id: no double count)."""

    pending: Pending
    why: str = ""


@dataclass(frozen=True)
class Acked:
    """The aggregator holds this update: it is no longer re-sent."""

    job: str
    round: int


Action = Accept | Park | Decline | Record | Forget | PublishStatus | Replay | Train | Resend | Acked


@dataclass(frozen=True)
class Lookups:
    """What the site reads to decide on a job; none of these changes anything.

    refusal: why the node's code or caps cannot run the job (plan, local algorithm, secure
    aggregation options, caps, compression), or None; datasets: the datasets with these tags,
    best first; privacy_refusal: why the dataset's privacy policy or budget refuses the job;
    plan_status: the admin's decision on the job's plan (None: never seen).
    """

    refusal: Callable[[JobSpec], str | None]
    datasets: Callable[[list[str]], list[Dataset]]
    privacy_refusal: Callable[[JobSpec, Dataset], str | None]
    plan_status: Callable[[JobSpec], PlanStatus | None]


class SiteJobs:
    """The jobs one site holds and the updates it owes; every step returns actions."""

    def __init__(self, name: str, lookups: Lookups, resend_after_s: float = 30.0) -> None:
        self.name = name
        self.lookups = lookups
        self.resend_after_s = resend_after_s
        self.jobs: dict[str, Job] = {}
        self.parked: dict[str, Parked] = {}
        self.pending: dict[tuple[str, int], Pending] = {}
        self.early_models: OrderedDict[str, Message] = OrderedDict()

    # --- queries ------------------------------------------------------------------------------

    def spec(self, job_id: str) -> JobSpec | None:
        """The spec of a job this node runs or waits on."""
        known = self.jobs.get(job_id) or self.parked.get(job_id)
        return known.spec if known is not None else None

    def job_ids(self) -> list[str]:
        return sorted(self.jobs)

    def plan_refusal(self, spec: JobSpec, status: PlanStatus) -> str:
        return f"plan {plan_id(spec.plan)[:16]} was {status} by the admin of node {self.name}"

    # --- jobs ---------------------------------------------------------------------------------

    def resume(self, spec: JobSpec, dataset: Dataset, state: str, sender: str, msg_id: str,
               wire: bytes | bytearray | memoryview) -> None:
        """Take back a job kept in the node's database (`accepted` or `parked`), already checked."""
        if state == "accepted":
            self.jobs[spec.job_id] = Job(spec, dataset)
        else:
            self.parked[spec.job_id] = Parked(spec, dataset, sender, msg_id, wire=wire)

    def on_job(self, msg: Message) -> list[Action]:
        """A job spec arrived (retained): accept, park, decline with the reason, or ignore."""
        spec: JobSpec = msg.body  # type: ignore[assignment]
        owner = spec.owner
        if spec.job_id != topics.job_of(msg.topic):
            return [Decline(spec.job_id, "job id does not match its topic", msg.sender, msg.id, owner)]
        if spec.job_id in self.jobs or spec.job_id in self.parked:
            return []
        if spec.nodes is not None and self.name not in spec.nodes:
            return [Record("job_not_selected", spec.job_id, msg.sender)]
        if (refusal := self.lookups.refusal(spec)) is not None:
            return [Decline(spec.job_id, refusal, msg.sender, msg.id, owner)]
        matches = self.lookups.datasets(spec.tags)
        if not matches:
            return [Decline(spec.job_id, f"no dataset with tags {sorted(spec.tags)} on node {self.name}",
                            msg.sender, msg.id, owner)]
        if (refusal := self.lookups.privacy_refusal(spec, matches[0])) is not None:
            return [Decline(spec.job_id, refusal, msg.sender, msg.id, owner)]
        status = self.lookups.plan_status(spec)
        if status in (PlanStatus.REJECTED, PlanStatus.REVOKED):
            return [Decline(spec.job_id, self.plan_refusal(spec, status), msg.sender, msg.id, owner)]
        if status != PlanStatus.APPROVED:
            parked = Parked(spec, matches[0], msg.sender, msg.id, wire=msg.wire)
            self.parked[spec.job_id] = parked
            return [Park(parked)]
        return self._accept(spec, matches[0], msg.sender, msg.id, msg.wire)

    def _accept(self, spec: JobSpec, dataset: Dataset, sender: str, msg_id: str,
                wire: bytes | bytearray | memoryview) -> list[Action]:
        self.jobs[spec.job_id] = Job(spec, dataset)
        actions: list[Action] = [Accept(spec, dataset, sender, msg_id, wire)]
        early = self.early_models.pop(spec.job_id, None)
        return actions + ([Replay(early)] if early is not None else [])

    def awaiting_decision(self) -> list[JobSpec]:
        """The jobs whose plan decision the admin may change: parked first, then running."""
        return [p.spec for p in self.parked.values()] + [j.spec for j in self.jobs.values()]

    def on_plan_decision(self, job_id: str, status: PlanStatus | None) -> list[Action]:
        """The admin's current decision on a job's plan: start a parked job whose plan was
        approved, drop a parked or running job whose plan was rejected or revoked."""
        if (parked := self.parked.get(job_id)) is not None:
            if status == PlanStatus.PENDING or status is None:
                return []
            del self.parked[job_id]
            if status == PlanStatus.APPROVED:
                replay = [Replay(parked.model)] if parked.model is not None else []
                return self._accept(parked.spec, parked.dataset, parked.sender, parked.msg_id, parked.wire) + replay
            return [Forget(job_id), Decline(job_id, self.plan_refusal(parked.spec, status), owner=parked.spec.owner)]
        job = self.jobs.get(job_id)
        if job is None or status not in (PlanStatus.REJECTED, PlanStatus.REVOKED):
            return []
        del self.jobs[job_id]
        self._drop_pending(job_id)
        return [Forget(job_id, training=True), Decline(job_id, self.plan_refusal(job.spec, status), owner=job.spec.owner),
                PublishStatus()]

    def on_withdrawn(self, job_id: str, by: str | None = None) -> list[Action]:
        """Its owner (or an admin) withdrew the job: drop it and what we owe it."""
        self._drop_pending(job_id)
        removed = self.jobs.pop(job_id, None) or self.parked.pop(job_id, None)
        actions: list[Action] = [Forget(job_id, secure=True, training=removed is not None,
                                        ended="withdrawn" if removed is not None else "")]
        return actions + ([Record("job_withdrawn", job_id, by)] if removed else [])

    def _ended(self, job_id: str, status: str, sender: str) -> list[Action]:
        """The job is done or failed (its model says so): forget it and what we owe it."""
        self._drop_pending(job_id)
        self.parked.pop(job_id, None)
        job = self.jobs.pop(job_id, None)
        if job is None:
            return [Forget(job_id, secure=True)]
        return [Forget(job_id, secure=True, training=True, ended=status), Record(f"job_{status}", job_id, sender),
                PublishStatus()]

    # --- models, updates, acknowledgements ----------------------------------------------------

    def on_model(self, msg: Message, now: float) -> list[Action]:
        """The job's model (retained, from its bound aggregator): the round to train, if any."""
        model = msg.body
        job_id = topics.job_of(msg.topic) or ""
        if model.status in ("done", "failed"):  # type: ignore[attr-defined]
            return self._ended(job_id, model.status, msg.sender)  # type: ignore[attr-defined]
        job = self.jobs.get(job_id)
        if job is None:
            if job_id in self.parked:
                self.parked[job_id].model = msg  # joins this round if approved in time
            else:
                self._hold_early_model(job_id, msg)
            return []
        r = model.open_round  # type: ignore[attr-defined]
        if model.status != "running" or r is None:  # type: ignore[attr-defined]
            self._drop_pending(job_id)
            return []
        self._drop_pending(job_id, before_round=r)  # closed rounds
        if is_selective(model.selection) and self.name not in model.nodes:  # type: ignore[attr-defined]
            return []  # not selected for this round
        # A node that was away (or started late) joins the round that is open now.
        if r in job.trained:
            unacked = self.pending.get((job_id, r))
            # the model again (a resumed aggregator): re-send at once
            return [Resend(unacked, "model_republished")] if unacked is not None else []
        job.trained.add(r)
        return [Train(job_id, r, model.params, now, dict(model.extra))]  # type: ignore[attr-defined]

    def on_update_sent(self, pending: Pending) -> None:
        """A trained update went out (or waits for the broker): re-sent until acknowledged."""
        self.pending[(pending.job, pending.round)] = pending

    def on_ack(self, job_id: str, round_: int, node: str) -> list[Action]:
        """The aggregator holds our update in a checkpoint: stop re-sending it."""
        if node != self.name or self.pending.pop((job_id, round_), None) is None:
            return []
        return [Acked(job_id, round_)]

    def due_resends(self, now: float, force: bool = False) -> list[Resend]:
        """The unacknowledged updates to send again now (all of them if `force`: a reconnect)."""
        due = [p for p in self.pending.values() if force or now - p.sent_at >= self.resend_after_s]
        for p in due:
            self.pending[(p.job, p.round)] = replace(p, sent_at=now)
        return [Resend(p) for p in due]

    def _hold_early_model(self, job_id: str, msg: Message) -> None:
        """A model whose job is not known (yet): kept, latest per job, for when the job arrives."""
        self.early_models.pop(job_id, None)
        self.early_models[job_id] = msg
        while len(self.early_models) > EARLY_MODELS:
            self.early_models.popitem(last=False)

    def _drop_pending(self, job: str, before_round: int | None = None) -> None:
        """Forget unacknowledged updates of `job` (of rounds before `before_round`, if given)."""
        for key in [k for k in self.pending if k[0] == job and (before_round is None or k[1] < before_round)]:
            del self.pending[key]
