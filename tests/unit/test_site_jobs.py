"""The site's decisions on jobs with a fake clock (node/jobs.py, issue 16): no broker, no sleeps.

`SiteJobs` is driven as NodeService drives it: an event in, the actions out, compared in order.
What the site looks up (refusals by its code and caps, its datasets, privacy, plan decisions)
is a table per test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common import topics
from common.envelope import Message
from common.messages import GlobalModel, JobSpec, PlanRef
from node.jobs import (
    EARLY_MODELS,
    Accept,
    Acked,
    Decline,
    Forget,
    Lookups,
    Park,
    Pending,
    PublishStatus,
    Record,
    Replay,
    Resend,
    SiteJobs,
    Train,
)
from node.plans import PlanStatus
from node.registry import Dataset

NODE = "site-a"
RESEARCHER = "alice"
AGG = "agg-1"
T0 = 500.0
RESEND_S = 30.0


def _dataset(name: str = "ds", tags: tuple[str, ...] = ("cohort",)) -> Dataset:
    return Dataset(name, "npz", f"/data/{name}.npz", list(tags), "", None, None, {"n_samples": 10}, 0.0)


@dataclass
class Site:
    """The lookups of one fake site: edit its fields, the SiteJobs reads them at each step."""

    datasets: list[Dataset] = field(default_factory=lambda: [_dataset()])
    refusal: str | None = None
    privacy: str | None = None
    plans: dict[str, PlanStatus] = field(default_factory=lambda: {"zoo:mlp": PlanStatus.APPROVED})

    def lookups(self) -> Lookups:
        return Lookups(refusal=lambda spec: self.refusal,
                       datasets=lambda tags: [d for d in self.datasets if set(tags) <= set(d.tags)],
                       privacy_refusal=lambda spec, ds: self.privacy,
                       plan_status=lambda spec: self.plans.get(f"zoo:{spec.plan.zoo}"))


def _site(site: Site | None = None) -> tuple[SiteJobs, Site]:
    site = site or Site()
    return SiteJobs(NODE, site.lookups(), resend_after_s=RESEND_S), site


def _job(job_id: str = "j1", *, topic_job: str | None = None, msg_id: str = "m1", **spec) -> Message:
    body = JobSpec(job_id=job_id, owner=RESEARCHER, plan=PlanRef(zoo=spec.pop("zoo", "mlp")), rounds=3,
                   tags=spec.pop("tags", ["cohort"]), **spec)
    return Message("job", msg_id, T0, RESEARCHER, "researcher", job_id, None, body,
                   topic=topics.job(RESEARCHER, topic_job or job_id), wire=b"signed:" + job_id.encode())


def _model(job_id: str = "j1", open_round: int | None = 1, *, status: str = "running", selection: str = "all",
           nodes: tuple[str, ...] = (), msg_id: str = "g1") -> Message:
    body = GlobalModel(round=(open_round or 1) - 1, params={}, status=status, open_round=open_round,
                       nodes=list(nodes), selection=selection)
    return Message("model", msg_id, T0, AGG, "aggregator", job_id, None, body, topic=topics.model(RESEARCHER, job_id))


def _train(job_id: str = "j1", r: int = 1, now: float = T0) -> Train:
    return Train(job_id, r, {}, now, {})


def _accepted(jobs: SiteJobs, job_id: str = "j1") -> None:
    actions = jobs.on_job(_job(job_id))
    assert [type(a) for a in actions] == [Accept]


def _sent(jobs: SiteJobs, job_id: str = "j1", r: int = 1, at: float = T0) -> Pending:
    pending = Pending(job_id, r, {"round": r}, f"u-{job_id}-{r}", at)
    jobs.on_update_sent(pending)
    return pending


# --- on_job: accept / park / decline(reason) / ignore -----------------------------------------

NO_DATASET = f"no dataset with tags ['other'] on node {NODE}"
PLAN = "plan zoo:mlp was {} by the admin of node " + NODE


@pytest.mark.parametrize(("case", "job", "site", "expected"), [
    ("approved plan: accepted", {}, {}, Accept),
    ("zoo plan never seen: parked", {}, {"plans": {}}, Park),
    ("plan pending: parked", {}, {"plans": {"zoo:mlp": PlanStatus.PENDING}}, Park),
    ("plan rejected", {}, {"plans": {"zoo:mlp": PlanStatus.REJECTED}}, PLAN.format("rejected")),
    ("plan revoked", {}, {"plans": {"zoo:mlp": PlanStatus.REVOKED}}, PLAN.format("revoked")),
    ("id does not match the topic", {"topic_job": "j2"}, {}, "job id does not match its topic"),
    ("node list without this node", {"nodes": ["site-b"]}, {}, Record("job_not_selected", "j1", RESEARCHER)),
    ("node list with this node", {"nodes": ["site-b", NODE]}, {}, Accept),
    ("refused by code or caps", {}, {"refusal": "rounds = 3 is over this node's max_rounds = 2"},
     "rounds = 3 is over this node's max_rounds = 2"),
    ("no dataset with the tags", {"tags": ["other"]}, {}, NO_DATASET),
    ("privacy policy", {}, {"privacy": "privacy policy: budget spent"}, "privacy policy: budget spent"),
    ("refusal comes before the dataset", {"tags": ["other"]}, {"refusal": "caps"}, "caps"),
    ("no dataset comes before privacy", {"tags": ["other"]}, {"privacy": "budget"}, NO_DATASET),
    ("privacy comes before the plan", {}, {"privacy": "budget", "plans": {}}, "budget"),
])
def test_on_job(case, job, site, expected):
    jobs, _ = _site(Site(**site))
    msg = _job(**job)
    actions = jobs.on_job(msg)
    if expected is Accept:
        assert actions == [Accept(msg.body, jobs.jobs["j1"].dataset, RESEARCHER, "m1", msg.wire)]
        assert jobs.job_ids() == ["j1"] and not jobs.parked
    elif expected is Park:
        assert [type(a) for a in actions] == [Park] and actions[0].parked is jobs.parked["j1"]
        assert (actions[0].parked.sender, actions[0].parked.msg_id, actions[0].parked.wire) == (RESEARCHER, "m1", msg.wire)
        assert not jobs.jobs
    elif isinstance(expected, Record):
        assert actions == [expected] and jobs.spec("j1") is None
    else:
        assert actions == [Decline("j1", expected, RESEARCHER, "m1", RESEARCHER)], case
        assert jobs.spec("j1") is None


def test_the_best_dataset_is_the_first_with_the_tags():
    jobs, _ = _site(Site(datasets=[_dataset("other", ("x",)), _dataset("first"), _dataset("second")]))
    jobs.on_job(_job())
    assert jobs.jobs["j1"].dataset.name == "first"


@pytest.mark.parametrize("held", ["accepted", "parked"])
def test_a_job_held_already_is_ignored(held):
    jobs, site = _site(Site(plans={} if held == "parked" else {"zoo:mlp": PlanStatus.APPROVED}))
    jobs.on_job(_job())
    site.refusal = "would refuse now"  # the retained job again (a reconnect): no second answer
    assert jobs.on_job(_job(msg_id="m2")) == []


def test_a_declined_job_is_answered_again_when_it_comes_again():
    jobs, _ = _site(Site(refusal="no"))
    assert jobs.on_job(_job()) == [Decline("j1", "no", RESEARCHER, "m1", RESEARCHER)]
    assert jobs.on_job(_job(msg_id="m2")) == [Decline("j1", "no", RESEARCHER, "m2", RESEARCHER)]


# --- on_model: train task or nothing -------------------------------------------------------------

@pytest.mark.parametrize(("case", "model", "expected"), [
    ("open round: train it", _model(), [_train()]),
    ("no open round", _model(open_round=None), []),
    ("all: any eligible node joins", _model(selection="all", nodes=("site-b",)), [_train()]),
    ("at_least: a late joiner trains too", _model(selection="at_least", nodes=("site-b",)), [_train()]),
    ("fraction, selected", _model(selection="fraction", nodes=(NODE,)), [_train()]),
    ("fraction, not selected", _model(selection="fraction", nodes=("site-b",)), []),
    ("late join: round 5 open", _model(open_round=5), [_train(r=5)]),
])
def test_on_model(case, model, expected):
    jobs, _ = _site()
    _accepted(jobs)
    assert jobs.on_model(model, T0) == expected, case


def test_each_round_is_trained_once_and_a_republished_model_resends_the_unacked_update():
    jobs, _ = _site()
    _accepted(jobs)
    assert jobs.on_model(_model(), T0) == [_train()]
    assert jobs.on_model(_model(), T0 + 1) == []  # training: nothing sent yet, nothing to re-send
    pending = _sent(jobs, at=T0 + 5)
    assert jobs.on_model(_model(msg_id="g2"), T0 + 6) == [Resend(pending, "model_republished")]
    assert jobs.on_ack("j1", 1, NODE) == [Acked("j1", 1)]
    assert jobs.on_model(_model(msg_id="g3"), T0 + 7) == []
    assert jobs.on_model(_model(open_round=2), T0 + 8) == [_train(r=2, now=T0 + 8)]


def test_models_of_other_jobs_and_unknown_jobs_train_nothing():
    jobs, _ = _site()
    _accepted(jobs)
    assert jobs.on_model(_model("j9"), T0) == []
    assert jobs.pending == {} and list(jobs.early_models) == ["j9"]


def test_a_model_before_its_job_is_held_and_replayed_on_accept():
    jobs, _ = _site()
    early = _model("j1")
    assert jobs.on_model(early, T0) == []
    actions = jobs.on_job(_job())
    assert [type(a) for a in actions] == [Accept, Replay] and actions[1] == Replay(early)
    assert jobs.on_model(early, T0 + 1) == [_train(now=T0 + 1)]  # the shell replays it
    assert not jobs.early_models


def test_early_models_are_bounded_latest_per_job():
    jobs, _ = _site()
    for i in range(EARLY_MODELS + 2):
        jobs.on_model(_model(f"j{i}"), T0)
    jobs.on_model(_model("j3", open_round=2), T0)
    assert list(jobs.early_models) == [f"j{i}" for i in (2, 4, 5)] + ["j3"]
    assert jobs.early_models["j3"].body.open_round == 2


def test_a_model_of_a_parked_job_is_kept_and_replayed_on_approval():
    jobs, site = _site(Site(plans={}))
    jobs.on_job(_job())
    first, latest = _model(msg_id="g1"), _model(open_round=2, msg_id="g2")
    assert jobs.on_model(first, T0) == [] and jobs.on_model(latest, T0) == []
    site.plans["zoo:mlp"] = PlanStatus.APPROVED
    actions = jobs.on_plan_decision("j1", PlanStatus.APPROVED)
    assert [type(a) for a in actions] == [Accept, Replay] and actions[1] == Replay(latest)
    assert jobs.on_model(latest, T0 + 1) == [_train(r=2, now=T0 + 1)]


@pytest.mark.parametrize("status", ["done", "failed"])
def test_the_job_ends_with_its_model(status):
    jobs, _ = _site()
    _accepted(jobs)
    _sent(jobs)
    assert jobs.on_model(_model(open_round=None, status=status), T0) == [
        Forget("j1", secure=True, training=True, ended=status), Record(f"job_{status}", "j1", AGG), PublishStatus()]
    assert not jobs.jobs and not jobs.pending
    assert jobs.on_model(_model(), T0) == []  # a stale model later: the job is gone


def test_a_parked_job_ends_with_its_model_without_training_to_stop():
    jobs, _ = _site(Site(plans={}))
    jobs.on_job(_job())
    assert jobs.on_model(_model(open_round=None, status="failed"), T0) == [Forget("j1", secure=True)]
    assert not jobs.parked


def test_a_model_without_an_open_round_or_of_a_later_round_drops_older_pending_updates():
    jobs, _ = _site()
    _accepted(jobs)
    jobs.on_model(_model(), T0)
    _sent(jobs, r=1)
    jobs.on_model(_model(open_round=3), T0 + 1)
    assert jobs.pending == {}
    _sent(jobs, r=3)
    jobs.on_model(_model(open_round=None), T0 + 2)
    assert jobs.pending == {}


# --- acks and re-sends -----------------------------------------------------------------------------

def test_acks_stop_resends_only_for_this_node_job_and_round():
    jobs, _ = _site()
    _accepted(jobs)
    pending = _sent(jobs)
    assert jobs.on_ack("j1", 1, "site-b") == []
    assert jobs.on_ack("j1", 2, NODE) == []
    assert jobs.on_ack("j2", 1, NODE) == []
    assert jobs.pending == {("j1", 1): pending}
    assert jobs.on_ack("j1", 1, NODE) == [Acked("j1", 1)]
    assert jobs.on_ack("j1", 1, NODE) == []  # a duplicate ack


def test_resends_are_due_after_the_interval_and_all_on_reconnect():
    jobs, _ = _site()
    _accepted(jobs)
    _accepted(jobs, "j2")
    a, b = _sent(jobs, at=T0), _sent(jobs, "j2", at=T0 + 10)
    assert jobs.due_resends(T0 + RESEND_S - 1) == []
    assert jobs.due_resends(T0 + RESEND_S) == [Resend(a)]
    assert jobs.due_resends(T0 + RESEND_S + 5) == []  # a was just re-sent: its clock restarted
    assert jobs.due_resends(T0 + 10 + RESEND_S) == [Resend(b)]
    due = jobs.due_resends(T0 + 42, force=True)
    assert [(r.pending.job, r.pending.msg_id) for r in due] == [("j1", a.msg_id), ("j2", b.msg_id)]  # same ids
    assert all(p.sent_at == T0 + 42 for p in jobs.pending.values())


# --- plan decisions --------------------------------------------------------------------------------

def test_plan_decisions_on_parked_jobs():
    jobs, _ = _site(Site(plans={}))
    for job_id in ("j1", "j2", "j3"):
        jobs.on_job(_job(job_id))
    assert [s.job_id for s in jobs.awaiting_decision()] == ["j1", "j2", "j3"]
    assert jobs.on_plan_decision("j1", None) == []
    assert jobs.on_plan_decision("j1", PlanStatus.PENDING) == []
    assert [type(a) for a in jobs.on_plan_decision("j1", PlanStatus.APPROVED)] == [Accept]
    assert jobs.on_plan_decision("j2", PlanStatus.REJECTED) == [Forget("j2"), Decline("j2", PLAN.format("rejected"), owner=RESEARCHER)]
    assert jobs.on_plan_decision("j3", PlanStatus.REVOKED) == [Forget("j3"), Decline("j3", PLAN.format("revoked"), owner=RESEARCHER)]
    assert jobs.job_ids() == ["j1"] and not jobs.parked


def test_a_revoked_plan_stops_a_running_job():
    jobs, _ = _site()
    _accepted(jobs)
    jobs.on_model(_model(), T0)
    _sent(jobs)
    assert jobs.on_plan_decision("j1", PlanStatus.APPROVED) == []
    assert jobs.on_plan_decision("j1", PlanStatus.REVOKED) == [
        Forget("j1", training=True), Decline("j1", PLAN.format("revoked"), owner=RESEARCHER), PublishStatus()]
    assert not jobs.jobs and not jobs.pending and jobs.due_resends(T0 + 999, force=True) == []
    assert jobs.on_plan_decision("j1", PlanStatus.REVOKED) == []


# --- withdrawal and resume -------------------------------------------------------------------------

@pytest.mark.parametrize("held", ["accepted", "parked", "unknown"])
def test_withdrawal(held):
    jobs, _ = _site(Site(plans={} if held == "parked" else {"zoo:mlp": PlanStatus.APPROVED}))
    if held != "unknown":
        jobs.on_job(_job())
    actions = jobs.on_withdrawn("j1")
    held_here = held != "unknown"
    assert actions == [Forget("j1", secure=True, training=held_here, ended="withdrawn" if held_here else "")] + ([Record("job_withdrawn", "j1")] if held_here else [])
    assert jobs.spec("j1") is None


def test_resume_from_what_the_shell_persisted():
    """A restarted node rebuilds its jobs from its database (Accept and Park are what it kept)."""
    jobs, site = _site(Site(plans={"zoo:mlp": PlanStatus.APPROVED}))
    accepted = jobs.on_job(_job("j1"))[0]
    site.plans = {}
    parked = jobs.on_job(_job("j2", msg_id="m2"))[0].parked
    jobs.on_model(_model("j1"), T0)
    kept = [(accepted.spec, accepted.dataset, "accepted", accepted.sender, accepted.msg_id, accepted.wire),
            (parked.spec, parked.dataset, "parked", parked.sender, parked.msg_id, parked.wire)]

    again, site2 = _site(Site(plans={}))
    for row in kept:
        again.resume(*row)
    assert again.job_ids() == ["j1"] and list(again.parked) == ["j2"]
    assert again.on_job(_job("j1")) == [] and again.on_job(_job("j2")) == []  # retained specs: held already
    assert again.on_model(_model("j1"), T0 + 100) == [_train(now=T0 + 100)]  # what it trained is in memory only
    assert again.on_model(_model("j2"), T0 + 100) == []
    site2.plans["zoo:mlp"] = PlanStatus.APPROVED
    actions = again.on_plan_decision("j2", PlanStatus.APPROVED)
    assert actions[0] == Accept(parked.spec, parked.dataset, RESEARCHER, "m2", parked.wire)
    assert [type(a) for a in actions] == [Accept, Replay]
