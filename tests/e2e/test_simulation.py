"""Simulation mode: many node identities in one process, through the real TLS broker and a
real aggregator process."""

from __future__ import annotations

import shutil

import pytest

from broker import process
from broker.local import LocalFederation
from node.simulation import SimulatedFleet
from researcher.experiment import Experiment
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e
N = 40


@pytest.fixture(scope="module")
def sim():
    fed = LocalFederation().start()
    fleet = None
    try:
        names = [f"sim-{i:03d}" for i in range(N)]
        bundles = fed.ws.enroll_many(names, "node")
        assert set(fed.ws.identities()) >= set(names)
        assert fed.ws.enroll_many(names[:3], "node") == bundles[:3]  # again: kept, not re-issued
        process.reload(fed.ws)
        fed.add_aggregator("agg-sim")
        fleet = SimulatedFleet(bundles)
        fleet.start(timeout_s=60)
        fed.wait_online(set(names), timeout_s=60)  # each simulated node published its own status
        yield fed, fleet, names
    finally:
        if fleet is not None:
            fleet.stop()
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def test_every_simulated_node_takes_part_in_every_round(sim):
    fed, fleet, names = sim
    exp = Experiment(fed.enroll("sim-researcher", "researcher"), plan="logreg", tags=["sim"], rounds=3, quorum=N,
                     round_deadline_s=60, model_args={"in_features": 10, "n_classes": 2},
                     training_args={"epochs": 2, "lr": 0.2, "batch_size": 16}, aggregator_identity="agg-sim")
    with exp:
        exp.submit()
        state = exp.watch(timeout_s=180, progress=False)
    assert state.status == "done", state.reason
    assert [sorted(r["node"] for r in h["reports"]) for h in state.history] == [sorted(names)] * 3
    losses = [h["metrics"]["train_loss"] for h in state.history]
    assert losses[-1] < losses[0]  # the synthetic task is learnable: the federation learns it
    assert fleet.updates_sent == 3 * N


def test_a_simulated_node_is_a_real_identity_to_the_broker(sim):
    fed, fleet, names = sim
    fed.ws.revoke(names[0])
    process.reload(fed.ws)  # the broker cuts that one connection, like any revoked site's
    assert wait_until(lambda: not fleet.nodes[names[0]].client.is_connected(), 10)
    assert fleet.nodes[names[1]].client.is_connected()
