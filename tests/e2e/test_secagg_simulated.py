"""Secure aggregation at 10 sites through the real broker and a real aggregator process, the
sites simulated (node/simulation.py: each its own identity, connection and `SecureRounds`),
0, 1 and 3 of them going silent at different stages (issue 20's correctness must-show); and
multi-round jobs: a steady round takes two broker round trips (keys carried, shares made ahead),
a site that never carried keys gets a key stage.

Each job has one round; the expected model is the plain FedAvg of the sites whose input must be
in the sum, computed from the updates the fleet kept: the secure model must equal it within the
quantisation bound (docs/secure-aggregation.md 4) plus float32 rounding.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from broker import process
from broker.local import LocalFederation
from common.secagg.encoding import Encoding
from node.simulation import SimulatedFleet
from researcher.experiment import Experiment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NAMES = [f"ssa-{i:02d}" for i in range(10)]
SECAGG = {"threshold": 5, "neighbours": 8, "clip": 2.0, "max_count": 1000}


@pytest.fixture(scope="module")
def sim():
    fed = LocalFederation().start()
    fleet = None
    try:
        bundles = fed.ws.enroll_many(NAMES, "node")
        process.reload(fed.ws)
        fed.add_aggregator("agg-ssa")
        researcher = fed.enroll("ssa-researcher", "researcher")
        fleet = SimulatedFleet(bundles, tag="ssa", samples=40, keep_updates=True)
        fleet.start(timeout_s=60)
        fed.wait_online(set(NAMES), timeout_s=60)
        warm = Experiment(researcher, plan="logreg", tags=["ssa"], rounds=1, quorum=10, round_deadline_s=60,
                          model_args={"in_features": 10, "n_classes": 2}, aggregator_identity="agg-ssa")
        with warm:  # the fleet's first training imports and warms torch: not in a stage's deadline
            warm.submit()
            assert warm.watch(timeout_s=120, progress=False).status == "done"
        yield researcher, fleet, fed
    finally:
        if fleet is not None:
            fleet.stop()
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def secure_job(researcher, fleet, silent: dict[str, str], rounds: int = 1):
    fleet.silent = dict(silent)
    exp = Experiment(researcher, plan="logreg", tags=["ssa"], rounds=rounds, quorum=5, round_deadline_s=30,
                     model_args={"in_features": 10, "n_classes": 2}, seed=5, aggregator_identity="agg-ssa",
                     training_args={"epochs": 1, "lr": 0.2, "batch_size": 8}, secure_aggregation=SECAGG)
    with exp:
        exp.submit()
        state = exp.watch(timeout_s=120, progress=False)
        initial = exp.initial_params()
    return exp.job_id, state, initial


def fedavg_of(fleet, job: str, sites: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    updates = [fleet.trained_updates[(s, job, 1)] for s in sites]
    total = sum(n for _, n in updates)
    mean = {k: sum(p[k].double() * n for p, n in updates) / total for k in updates[0][0]}
    return mean, total


@pytest.mark.parametrize("silent, included", [
    ({}, NAMES),
    ({"ssa-03": "after_masked"}, NAMES),  # masked update sent, silent during unmasking: in the sum
    ({"ssa-01": "before_keys", "ssa-04": "before_masked", "ssa-07": "after_masked"},
     [n for n in NAMES if n not in ("ssa-01", "ssa-04")]),
], ids=["none", "one-during-unmask", "three-at-three-stages"])
def test_the_secure_sum_is_the_plain_fedavg_of_the_sites_in_it(sim, silent, included):
    researcher, fleet, _ = sim
    job, state, initial = secure_job(researcher, fleet, silent)
    assert state.status == "done", state.reason
    notes = state.history[0]["notes"]["secure_aggregation"]
    assert notes["included"] == included
    expected, total = fedavg_of(fleet, job, included)
    assert notes["total_count"] == total
    bound = Encoding(SECAGG["clip"], len(NAMES), SECAGG["max_count"]).mean_error_bound(len(included), total)
    diff = max(float((state.params[k].double() - expected[k]).abs().max()) for k in expected)
    scale = max(float(expected[k].abs().max()) for k in expected)
    print(f"silent={silent}: max |secure - plain FedAvg| {diff:.3g}, quantisation bound {bound:.3g}")
    assert diff <= bound + 2 * scale * 2**-24, (diff, bound)  # + float32 rounding of the published model


def stages_by_round(fed, job: str) -> dict[int, list[str]]:
    """The stages the aggregator published per round (its log: `secagg_stage`)."""
    time.sleep(0.3)  # the log line of the last stage
    out: dict[int, list[str]] = {}
    for line in (fed.root / "logs" / "agg-agg-ssa.log").read_text().splitlines():
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "secagg_stage" and event.get("job") == job:
            out.setdefault(event["round"], []).append(event["stage"])
    return out


def test_steady_rounds_take_two_round_trips_and_a_site_that_carried_no_keys_gets_a_key_stage(sim):
    researcher, fleet, fed = sim
    job, state, _ = secure_job(researcher, fleet, {}, rounds=3)
    assert state.status == "done", state.reason
    assert stages_by_round(fed, job) == {1: ["keys", "shares", "masked", "unmask"], 2: ["masked", "unmask"],
                                         3: ["masked", "unmask", "done"]}
    assert all(h["notes"]["secure_aggregation"]["included"] == NAMES for h in state.history)
    # ssa-04 stops before its masked input every round: it never carries keys, so round 2 asks again
    job, state, _ = secure_job(researcher, fleet, {"ssa-04": "before_masked"}, rounds=2)
    assert state.status == "done", state.reason
    stages = stages_by_round(fed, job)
    assert stages[1] == stages[2][:4] == ["keys", "shares", "masked", "unmask"], stages
    assert all(h["notes"]["secure_aggregation"]["included"] == [n for n in NAMES if n != "ssa-04"]
               for h in state.history)
