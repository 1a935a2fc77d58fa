"""Aggregators as a fleet (issue 23), through the real broker and real processes: each job
claimed by exactly one aggregator, spread over them; a late aggregator claims no finished
job; a holder SIGKILLed mid-round and never restarted is taken over with a bit-identical
result; a broker SIGKILL in the claim window leaves no job claimed twice or orphaned.

One federation for the module (3 nodes, aggregators fleet-a/b/c started together), used in
file order: starting one costs more than the jobs on this 2-core machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import defaultdict

import pytest

from tests.chaos.harness import (
    NODES,
    Run,
    acked,
    experiment,
    federation,
    finish,
    folds,
    same_params,
    teardown,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(1500)]
AGGS = ("fleet-a", "fleet-b", "fleet-c")
LEASE_S = 4.0
ENV = {"FBM_FLEET_LEASE_S": str(LEASE_S), "FBM_FLEET_SETTLE_S": "1", "FBM_FLEET_SKEW_S": "0.1",
       "FBM_FLEET_CHECKPOINT_WAIT_S": "2", "FBM_MQTT_RECONNECT_MAX_S": "1"}
QUICK = {"rounds": 2, "step_delay_s": 0.0, "deadline_s": 60}
MID_ROUND = {**QUICK, "step_delay_s": 0.2}  # site-3 trains ~2 s longer: a round stays open after the first ack
EVERY_FOLD = sorted((r, n) for r in (1, 2) for n in NODES)


@pytest.fixture(scope="module")
def fleet():
    run = federation(aggregators=AGGS, agg_env=ENV)
    yield run
    if os.environ.get("FBM_KEEP_LOGS"):  # debugging: the logs outlive the federation
        shutil.copytree(run.fed.root / "logs", os.environ["FBM_KEEP_LOGS"], dirs_exist_ok=True)
    teardown(run)


@pytest.fixture(scope="module")
def undisturbed(fleet):
    exp = experiment(fleet, **QUICK)
    exp.submit()
    state = finish(fleet, exp)
    assert state.status == "done", state.reason
    assert sorted(folds(state)) == EVERY_FOLD
    return state


def _claims(run: Run) -> list:
    """Every claim the admin observer saw (the audit of claims), in order."""
    with contextlib.suppress(TimeoutError):
        run.wait_event(lambda m: False, timeout_s=0.5)  # drain what is queued into run.seen
    return [m for m in run.seen if m.type == "job_claim"]


def _holders(run: Run) -> dict[str, set[str]]:
    held: dict[str, set[str]] = defaultdict(set)
    for m in _claims(run):
        if m.body.state == "held":
            held[m.body.job].add(m.sender)
    return held


def _log_events(run: Run, label: str, event: str) -> list[dict]:
    lines = (run.fed.root / "logs" / f"{label}.log").read_text(errors="replace").splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def _unclaiming_log(fleet, name: str) -> str:
    """What an aggregator that claimed too few jobs logged, less the updates it could not open."""
    lines = (fleet.fed.root / "logs" / f"agg-{name}.log").read_text().splitlines()
    return "\n".join(line for line in lines if "/updates/" not in line)[-6000:]


def test_ten_jobs_at_once_each_run_by_exactly_one_aggregator_spread_and_a_late_one_claims_none(fleet, undisturbed):
    # each node trains one job at a time and starts a process per job: ten jobs need a long deadline
    # each job lasts a few seconds (a step delay, same model): a job that ends within a settle
    # window leaves every load at 0, and the spread would be the tie-break's alone
    exps = [experiment(fleet, **{**QUICK, "step_delay_s": 0.1, "deadline_s": 400}) for _ in range(10)]
    for exp in exps:  # at once
        exp.submit()
    states = [finish(fleet, exp, timeout_s=600) for exp in exps]
    assert [s.status for s in states] == ["done"] * 10, [s.reason for s in states]
    assert all(same_params(s.params, undisturbed.params) for s in states)  # the same job, the same model
    holders = _holders(fleet)
    assert all(len(holders[exp.job_id]) == 1 for exp in exps), holders
    claimed = {a: [e["job"] for e in _log_events(fleet, f"agg-{a}", "job_claimed")] for a in AGGS}
    mine = {exp.job_id for exp in exps}
    counts = {a: len(mine & set(jobs)) for a, jobs in claimed.items()}
    assert sorted(j for jobs in claimed.values() for j in jobs if j in mine) == sorted(mine)  # each once
    assert all(n >= 2 for n in counts.values()), (counts, {a: _unclaiming_log(fleet, a) for a in AGGS
                                                           if counts[a] < 2})  # spread over the three
    print("jobs per aggregator:", counts)
    fleet.fed.add_aggregator("fleet-late", env=ENV)
    time.sleep(10)  # started, read every retained claim, settled
    assert _log_events(fleet, "agg-fleet-late", "aggregator_started")
    assert not [m for m in _claims(fleet) if m.sender == "fleet-late"]
    assert not _log_events(fleet, "agg-fleet-late", "job_claimed")
    listed = fleet.fed.run_cli("researcher", "aggregators", "--bundle", str(fleet.fed.ws.bundle_dir("alice")))
    assert all(name in listed for name in (*AGGS, "fleet-late")) and "online" in listed, listed


def test_the_holder_sigkilled_mid_round_is_taken_over_and_the_model_is_bit_identical(fleet, undisturbed):
    exp = experiment(fleet, **MID_ROUND)
    exp.submit()
    fleet.wait_event(lambda m: acked(2)(m) and m.job == exp.job_id)  # an update of round 2 folded, state shared
    (holder,) = _holders(fleet)[exp.job_id]
    fleet.kill(fleet.fed.process(f"agg-{holder}"))  # never restarted
    killed = time.time()
    taker = fleet.wait_event(lambda m: m.type == "job_claim" and m.body.job == exp.job_id and m.body.state == "held"
                             and m.sender != holder, timeout_s=60)
    taken_over_s = time.time() - killed
    state = finish(fleet, exp)
    assert state.status == "done", state.reason
    assert sorted(folds(state)) == EVERY_FOLD, "an update was lost or counted twice"
    assert same_params(state.params, undisturbed.params), "final model differs from the undisturbed run"
    assert taker.body.epoch == 2 and taker.body.previous == holder
    assert state.aggregators == [taker.sender]  # the researcher followed the take-over
    (took,) = [e for e in _log_events(fleet, f"agg-{taker.sender}", "job_taken_over") if e["job"] == exp.job_id]
    assert took["open"] and took["round"] == 1, took  # resumed mid-round 2 from the shared state
    assert taken_over_s <= LEASE_S + QUICK["deadline_s"]
    print(f"taken over {taken_over_s:.1f} s after the SIGKILL (lease {LEASE_S} s), state fetched in {took['fetch_s']} s")


def test_a_broker_sigkill_in_the_claim_window_leaves_no_job_claimed_twice_or_orphaned(fleet):
    exps = [experiment(fleet, **{**QUICK, "deadline_s": 300}) for _ in range(3)]  # a loaded machine spawns slowly
    for exp in exps:
        exp.submit()
    mine = {exp.job_id for exp in exps}
    fleet.wait_event(lambda m: m.type == "job_claim" and m.body.job in mine and m.body.state == "bid", timeout_s=60)
    fleet.restart_broker(hard=True)
    states = [finish(fleet, exp, timeout_s=600) for exp in exps]
    assert [s.status for s in states] == ["done"] * 3, [s.reason for s in states]
    holders = _holders(fleet)
    assert all(len(holders[job]) == 1 for job in mine), holders
    for log in (fleet.fed.root / "logs").glob("agg-*.log"):
        assert not [e for e in _log_events(fleet, log.stem, "job_hand_over") if e["job"] in mine]
