"""Issue 20: until the node runs secure aggregation (node/secagg.py is not wired into the
service yet), a job that asks for it is declined, never trained with plain updates (real broker,
real node processes)."""

from __future__ import annotations

import pytest

from common.identity import Identity
from researcher.experiment import Experiment
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

NODES = ["site-1", "site-2"]
MLP = {"in_features": 784, "hidden": [16], "n_classes": 10}


def test_a_secure_aggregation_job_is_declined_not_trained_in_the_clear(sites):
    alice = Identity.load(sites.ws.bundle_dir("alice"))
    exp = Experiment(alice, plan="mlp", tags=["fmnist"], quorum=2, model_args=MLP, rounds=1,
                     round_deadline_s=60.0, training_args={"epochs": 1, "lr": 0.05, "batch_size": 50},
                     secure_aggregation={"threshold": 2, "neighbours": 2, "clip": 1.0})

    def declines() -> dict[str, str]:
        exp.poll(0.2)
        return {n["node"]: n["error"] for n in exp.state.notices if n["data"].get("status") == "declined"}

    try:
        exp.submit()
        assert wait_until(lambda: set(declines()) == set(NODES), 30), exp.state.notices
        assert all("secure aggregation" in e for e in declines().values())
    finally:
        exp.withdraw()
        exp.close()
