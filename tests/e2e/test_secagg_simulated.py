"""Secure aggregation at 10 sites through the real broker and a real aggregator process, the
sites simulated (node/simulation.py: each its own identity, connection and `SecureRounds`),
0, 1 and 3 of them going silent at different stages (issue 20's correctness must-show).

Each job has one round; the expected model is the plain FedAvg of the sites whose input must be
in the sum, computed from the updates the fleet kept: the secure model must equal it within the
quantisation bound (docs/secure-aggregation.md 4) plus float32 rounding.
"""

from __future__ import annotations

import shutil

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
        yield researcher, fleet
    finally:
        if fleet is not None:
            fleet.stop()
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def secure_job(researcher, fleet, silent: dict[str, str]):
    fleet.silent = dict(silent)
    exp = Experiment(researcher, plan="logreg", tags=["ssa"], rounds=1, quorum=5, round_deadline_s=30,
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
    researcher, fleet = sim
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
