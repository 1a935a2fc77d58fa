"""Issue 17, attack 7c: zoo plans run without approval, so a researcher could ask any node for
any number of epochs or rounds, or rounds of any length. The node's admin caps them in
node.toml (`max_epochs`, `max_rounds`, `max_round_seconds`); a job over a cap is declined and
the researcher is told which cap (real broker, real node processes)."""

from __future__ import annotations

import pytest

from common.identity import Identity
from researcher.experiment import Experiment
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

NODES = ["site-1", "site-2"]
MLP = {"in_features": 784, "hidden": [16], "n_classes": 10}


def _declines(exp: Experiment) -> dict[str, str]:
    exp.poll(0.2)
    return {n["node"]: n["error"] for n in exp.state.notices if n["data"].get("status") == "declined"}


@pytest.mark.parametrize(("over", "cap"), [
    ({"training_args": {"epochs": 1_000_000, "lr": 0.05, "batch_size": 50}}, "max_epochs = 100"),
    ({"rounds": 50_000}, "max_rounds = 1000"),
    ({"round_deadline_s": 7 * 24 * 3600.0}, "max_round_seconds = 3600"),
])
def test_a_zoo_job_over_a_nodes_cap_is_declined_with_the_cap_named(sites, over, cap):
    alice = Identity.load(sites.ws.bundle_dir("alice"))
    args = {"rounds": 1, "round_deadline_s": 60.0, "training_args": {"epochs": 1, "lr": 0.05, "batch_size": 50}, **over}
    exp = Experiment(alice, plan="mlp", tags=["fmnist"], quorum=2, model_args=MLP, **args)
    try:
        exp.submit()
        assert wait_until(lambda: set(_declines(exp)) == set(NODES), 30), exp.state.notices
        for node, error in _declines(exp).items():
            assert cap in error, (node, error)
    finally:
        exp.withdraw()
        exp.close()
