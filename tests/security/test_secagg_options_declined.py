"""Issue 20: a node runs secure aggregation, but declines (fails closed) a secure job whose
options would make it send something other than its full update delta, masked: update
compression, or a per-node local algorithm. It never trains such a job in the clear (real
broker, real node processes). Before the nodes ran secure aggregation, every secure job was
declined here; the decline is kept for what a node cannot honour."""

from __future__ import annotations

import pytest

from common.identity import Identity
from researcher.experiment import Experiment
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

NODES = ["site-1", "site-2"]
MLP = {"in_features": 784, "hidden": [16], "n_classes": 10}


def test_a_secure_job_with_update_compression_is_declined_not_trained_in_the_clear(sites):
    alice = Identity.load(sites.ws.bundle_dir("alice"))
    exp = Experiment(alice, plan="mlp", tags=["fmnist"], quorum=2, model_args=MLP, rounds=1,
                     round_deadline_s=60.0, training_args={"epochs": 1, "lr": 0.05, "batch_size": 50,
                                                           "compression": {"kind": "int8"}},
                     secure_aggregation={"threshold": 2, "neighbours": 2, "clip": 1.0})

    def declines() -> dict[str, str]:
        exp.poll(0.2)
        return {n["node"]: n["error"] for n in exp.state.notices if n["data"].get("status") == "declined"}

    try:
        exp.submit()
        assert wait_until(lambda: set(declines()) == set(NODES), 30), exp.state.notices
        assert all("secure aggregation" in e and "compression" in e for e in declines().values())
    finally:
        exp.withdraw()
        exp.close()
