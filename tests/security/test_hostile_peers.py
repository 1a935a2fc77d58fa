"""Hostile peers with valid identities (issue 17, attacks 3, 4 and 6), against real processes.

Each attacker is an enrolled identity driven by the test through the project's own client
library (signed envelopes, the ACL lets it write where its role may): an enrolled node that
no job selected, a second aggregator, a node that sends a broken SCAFFOLD control delta.
Only the receivers' own checks (aggregator, nodes, the researcher's Experiment) stop them.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Callable, Collection

import pytest
import torch

from common import topics
from common.identity import Identity
from common.messages import DatasetInfo, GlobalModel, NodeStatus, UpdateReceived
from common.messenger import Messenger
from common.settings import TransportSettings
from researcher.experiment import Experiment, JobState

pytestmark = pytest.mark.e2e

SITES = ["site-1", "site-2"]
MODEL = {"in_features": 784, "hidden": [16], "n_classes": 10}


def _experiment(fed, **kw) -> Experiment:
    kw = {"rounds": 3, "round_deadline_s": 60, **kw}
    return Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], quorum=2,
                      model_args=MODEL, seed=2,
                      training_args={"epochs": 20, "lr": 0.05, "batch_size": 50}, **kw)  # rounds long enough for a strike to land


def _finish(exp: Experiment, timeout_s: float = 150) -> JobState:
    try:
        return exp.watch(timeout_s=timeout_s, progress=False)
    finally:
        exp.close()


def _run_beside(fed, exp: Experiment, on_round, attacker) -> JobState:
    """Submit the job and see it to its end while `on_round(r)` strikes as each round opens."""
    clock = OnRound(fed, exp.job_id, on_round)
    try:
        exp.submit()
        return _finish(exp)
    finally:
        clock.close()
        attacker.close()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _folded(state: JobState) -> list[list[str]]:
    return [sorted(r["node"] for r in h["reports"]) for h in state.history]


class Peer:
    """An enrolled identity the test drives, with the signing client every party uses."""

    def __init__(self, fed, name: str, role: str) -> None:
        self.name = name
        self.m = Messenger(Identity.load(fed.enroll(name, role)), TransportSettings(clean_start=True, session_expiry_s=0),
                           client_id=uuid.uuid4().hex[:6])
        self.m.connect()

    def close(self) -> None:
        if self.m.identity.role == "node":  # leave the aggregators' node directory as it was
            self.m.send(topics.status(self.name), "node_status", NodeStatus(state="offline"), retain=True)
        self.m.close()


class OnRound:
    """Calls act(round) as soon as a round of `job` opens (its `round_opened` event: the model,
    the first sign, is sealed for the job's participants since issue 18), on a thread of its
    own. Only the timing comes from here (an admin observer): the attackers need no more than
    their own role's rights to strike. `aggregators`: whose `round_opened` counts (a fleet:
    whichever claims the job)."""

    def __init__(self, fed, job: str, act: Callable[[int], None], aggregators: Collection[str] = ("agg-1",)) -> None:
        self.errors: list[BaseException] = []
        self._aggregators = frozenset(aggregators)
        self._rounds: queue.Queue = queue.Queue()
        self._seen: set[int] = set()
        self.m = Messenger(Identity.load(fed.enroll("hostile-clock", "admin")),
                           TransportSettings(clean_start=True, session_expiry_s=0), client_id=uuid.uuid4().hex[:6])
        self.m.subscribe(topics.events("alice", job), self._on_opened, types={"round_opened"})
        self.m.connect()
        threading.Thread(target=self._loop, args=(act,), daemon=True).start()

    def _on_opened(self, msg) -> None:
        r = msg.body.round
        if msg.sender not in self._aggregators or r in self._seen:
            return
        self._seen.add(r)
        self._rounds.put(r)

    def _loop(self, act: Callable[[int], None]) -> None:
        while (r := self._rounds.get()) is not None:
            try:
                act(r)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)

    def close(self) -> None:
        self._rounds.put(None)
        self.m.close()
        assert not self.errors, self.errors


def run_undisturbed(exp: Experiment) -> JobState:
    """A job like the attacked ones, with nobody attacking (same seeds: same model)."""
    exp.submit()
    state = _finish(exp)
    assert state.status == "done", state.reason
    assert _folded(state) == [SITES] * exp.spec().rounds
    return state


@pytest.fixture(scope="module")
def undisturbed(sites) -> JobState:
    return run_undisturbed(_experiment(sites))


def test_an_enrolled_node_outside_the_job_cannot_take_over_its_model(sites, undisturbed):
    """Attack 3: an enrolled node with no dataset (so never eligible) sends a signed update
    claiming 10**15 samples each round. Before: folded every round, the final weights were its own."""
    fed = sites
    intruder = Peer(fed, "intruder", "node")
    intruder.m.send(topics.status("intruder"), "node_status", NodeStatus(state="online"), retain=True)
    exp = _experiment(fed)
    evil = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in exp.initial_params().items()}

    def send(r: int) -> None:
        intruder.m.send(topics.update("alice", exp.job_id, "intruder"), "update",
                        {"round": r, "params": evil, "n_samples": 10**15}, job=exp.job_id, round_=r)

    state = _run_beside(fed, exp, send, intruder)
    assert state.status == "done", state.reason
    assert _folded(state) == [SITES] * 3, "the intruder's update was folded"
    assert not any(torch.equal(state.params[k], evil[k]) for k in evil if evil[k].is_floating_point())
    assert _same(state.params, undisturbed.params), "the final model differs from the undisturbed run's"
    for h in state.history:  # the researcher sees who was refused, and why
        assert "not selected" in h["notes"]["rejected"]["intruder"], h["notes"]


def test_a_round_that_produces_a_non_finite_model_fails_and_publishes_nothing(sites):
    """The new global model is checked before it is published: a server step that overflows
    (FedAvgM with lr=1e300) fails the job with a reason; the last good model stays."""
    exp = _experiment(sites, rounds=2, aggregator="fedavgm", aggregator_args={"lr": 1e300}, round_deadline_s=20)
    initial = exp.initial_params()
    exp.submit()
    state = _finish(exp)
    assert state.status == "failed"
    assert "round 1" in state.reason and "invalid global model" in state.reason, state.reason
    assert _same(state.params, initial), "a model other than the last good one was published"


def _node_log_events(fed, node: str, event: str) -> list[dict]:
    lines = (fed.root / "logs" / f"node-{node}.log").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def test_a_second_aggregator_cannot_end_or_acknowledge_another_aggregators_job(sites, undisturbed):
    """Attack 4: when round 2 opens, another aggregator identity publishes a retained `done`
    model with its own tensors, a `job_failed` event, and acks of round 2 to every node.
    Before: the researcher's watch returned the forged model and the nodes dropped the job."""
    fed = sites
    rogue = Peer(fed, "agg-rogue", "aggregator")
    exp = _experiment(fed)
    evil = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in exp.initial_params().items()}

    def strike(r: int) -> None:
        if r != 2:
            return
        for node in SITES:
            rogue.m.send(topics.requests(node), "update_received", UpdateReceived(round=r, node=node),
                         job=exp.job_id, round_=r)
        rogue.m.send(topics.model("alice", exp.job_id), "model",
                     GlobalModel(round=3, params=evil, aggregator="agg-rogue", status="done"),
                     job=exp.job_id, round_=3, retain=True)
        rogue.m.send(topics.events("alice", exp.job_id), "job_failed", {"reason": "forged", "round": r}, job=exp.job_id)

    state = _run_beside(fed, exp, strike, rogue)
    assert state.status == "done", state.reason
    assert _folded(state) == [SITES] * 3
    assert _same(state.params, undisturbed.params), "the researcher took the forged model"
    assert state.aggregator == "agg-1"
    assert {(d["type"], d["sender"]) for d in state.dropped} == {("model", "agg-rogue"), ("job_failed", "agg-rogue")}
    for node in SITES:
        dropped = [e for e in _node_log_events(fed, node, "foreign_aggregator_dropped") if e.get("job") == exp.job_id]
        assert {e["type"] for e in dropped} == {"model", "update_received"}, dropped
        assert all(e["sender"] == "agg-rogue" and e["bound"] == "agg-1" for e in dropped), dropped


def test_one_broken_scaffold_update_is_rejected_and_the_job_goes_on(sites):
    """Attack 6: an eligible node (it declares a dataset with the job's tags) sends SCAFFOLD
    updates whose control delta is mis-shaped (round 1), NaN (round 2), Inf (round 3).
    Before: round 1 crashed the job for everyone (RuntimeError)."""
    fed = sites
    bad = Peer(fed, "site-bad", "node")
    info = DatasetInfo(name="fm", tags=["fmnist"], type="npz", n_samples=100)
    bad.m.send(topics.status("site-bad"), "node_status", NodeStatus(state="online", datasets=[info]), retain=True)
    exp = _experiment(fed, aggregator="scaffold")
    start = exp.initial_params()
    floats = [k for k, v in start.items() if v.is_floating_point()]

    def send(r: int) -> None:
        extra = {f"c/{k}": torch.zeros_like(start[k]) for k in floats}
        last = f"c/{floats[-1]}"  # the last one: the earlier deltas would already be summed
        extra[last] = {1: torch.zeros(3), 2: torch.full_like(start[floats[-1]], float("nan")),
                       3: torch.full_like(start[floats[-1]], float("inf"))}[r]
        bad.m.send(topics.update("alice", exp.job_id, "site-bad"), "update",
                   {"round": r, "params": start, "n_samples": 100, "extra": extra}, job=exp.job_id, round_=r)

    state = _run_beside(fed, exp, send, bad)
    assert state.status == "done", state.reason
    assert _folded(state) == [SITES] * 3
    reasons = [h["notes"]["rejected"]["site-bad"] for h in state.history]
    assert "shape" in reasons[0] and "NaN" in reasons[1] and "Inf" in reasons[2], reasons
    assert all(bool(torch.isfinite(v).all()) for v in state.extra.values())
