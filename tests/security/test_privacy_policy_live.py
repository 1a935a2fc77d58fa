"""The site's privacy policy against a researcher's job, through the real broker (issue 19).

The extraction job of tests/security/test_dp_noise.py (one node, quorum 1, batch_size 1, one
batch: the update is one patient's gradient, read back exactly) is declined by the default
policy. A site that requires DP and keeps a budget accepts a DP job, tells its cost, and
declines the job that would exceed what is left.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from broker.local import LocalFederation
from common import topics
from common.identity import Identity
from researcher.experiment import Experiment
from tests.conftest import Inbox, fast_settings, open_messenger

pytestmark = pytest.mark.integration
BUDGET = 12.0  # a 3-round job at sigma 1.0 costs epsilon 9.09 (delta 1e-5): one fits, two do not
# DP-SGD on 200 rows, batch 32 (q 0.16, 7 steps a round), noise multiplier 1.5, 3 rounds: epsilon 3.155
DP_SGD_BUDGET = 5.0


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        rng = np.random.default_rng(3)
        table = np.column_stack([rng.normal(size=(200, 4)).round(3), rng.integers(0, 2, 200)])
        path = fed.root / "cohort.csv"
        np.savetxt(path, table, delimiter=",", header="a,b,c,d,label", comments="", fmt="%g")
        ds = [{"name": "cohort", "type": "csv", "path": str(path), "tag": "cohort", "target": "label"}]
        fed.add_node("site-default", ds)
        fed.add_node("site-budget", ds, env={"FBM_NODE_PRIVACY__DP_REQUIRED": "true",
                                             "FBM_NODE_PRIVACY__EPSILON_BUDGET": str(BUDGET)})
        fed.add_node("site-dpsgd", ds, env={"FBM_NODE_PRIVACY__DP_REQUIRED": "true",
                                            "FBM_NODE_PRIVACY__EPSILON_BUDGET": str(DP_SGD_BUDGET)})
        fed.enroll("mallory", "researcher")
        fed.wait_online({"site-default", "site-budget", "site-dpsgd"})
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _answer(fed, clients, node: str, training_args: dict, rounds: int = 1) -> dict:
    """Submit a job for `node` alone and return the node's answer to it."""
    inbox = Inbox()
    watcher = open_messenger(fed, "mallory", clients, settings=fast_settings(), client_id=f"w{time.monotonic_ns()}")
    watcher.subscribe(topics.replies(node, "mallory"), inbox, types={"reply"})
    exp = Experiment(Identity.load(fed.ws.bundle_dir("mallory")), plan="logreg", tags=["cohort"], nodes=[node],
                     rounds=rounds, quorum=1, model_args={"in_features": 4, "n_classes": 2},
                     training_args={"lr": 0.5, "optimizer": "sgd", **training_args})
    clients.append(exp)
    job = exp.submit()
    assert inbox.wait_for(lambda items: any(m.job == job for m in items), 20), f"{node} did not answer"
    reply = next(m for m in inbox.items if m.job == job).body
    exp.withdraw()
    return {"ok": reply.ok, "error": reply.error, **reply.data}


def test_the_extraction_job_is_declined_by_the_default_policy(fed, clients):
    answer = _answer(fed, clients, "site-default", {"batch_size": 1, "max_batches": 1, "epochs": 1})
    assert answer["status"] == "declined"
    assert "privacy policy: batch_size 1 is below the minimum 8" in answer["error"]
    fine = _answer(fed, clients, "site-default", {"batch_size": 32, "epochs": 1})
    assert fine["status"] == "accepted", fine


def test_a_budgeted_site_requires_dp_and_declines_the_job_over_budget(fed, clients):
    plain = _answer(fed, clients, "site-budget", {"batch_size": 32})
    assert plain["status"] == "declined" and "requires client-level DP" in plain["error"]
    dp = {"batch_size": 32, "dp": {"clip": 1.0, "sigma": 1.0}}
    first = _answer(fed, clients, "site-budget", dp, rounds=3)
    assert first["status"] == "accepted", first
    assert first["privacy"]["epsilon"] == pytest.approx(9.0879, abs=1e-3)
    assert first["privacy"]["epsilon_left"] == pytest.approx(BUDGET - 9.0879, abs=1e-3)
    second = _answer(fed, clients, "site-budget", dp, rounds=3)
    assert second["status"] == "declined"
    assert "would spend epsilon 9.09" in second["error"] and "2.91 of its budget 12 is left" in second["error"]


def test_a_dp_sgd_job_is_priced_by_the_accountant_and_the_one_over_budget_declined(fed, clients):
    dp_sgd = {"batch_size": 32, "dp": {"mode": "sample", "noise_multiplier": 1.5, "max_grad_norm": 1.0}}
    low = _answer(fed, clients, "site-dpsgd", {**dp_sgd, "dp": {**dp_sgd["dp"], "noise_multiplier": 0.3}}, rounds=3)
    assert low["status"] == "declined" and "DP sigma 0.3 is below the minimum 0.5" in low["error"]
    first = _answer(fed, clients, "site-dpsgd", dp_sgd, rounds=3)
    assert first["status"] == "accepted", first
    assert first["privacy"]["mode"] == "sample" and first["privacy"]["epsilon"] == pytest.approx(3.155, abs=1e-3)
    second = _answer(fed, clients, "site-dpsgd", dp_sgd, rounds=3)
    assert second["status"] == "declined"
    assert "would spend epsilon 3.15" in second["error"] and "1.85 of its budget 5 is left" in second["error"]


def test_the_admin_reads_the_budget_and_its_spend_from_the_cli(fed, clients):
    """`fbm-node dataset privacy` shows what the console shows: the policy in force, the
    budget, and each job's epsilon (after the budget test above, one job spent 9.09)."""
    import json
    import os
    import subprocess
    import sys

    node_dir = fed.root / "nodes" / "site-budget"
    env = {**os.environ, "FBM_NODE_PRIVACY__DP_REQUIRED": "true", "FBM_NODE_PRIVACY__EPSILON_BUDGET": str(BUDGET)}
    out = subprocess.run([sys.executable, "-m", "node", "dataset", "privacy", "cohort", "--dir", str(node_dir),
                          "--json"], capture_output=True, text=True, env=env, check=True).stdout
    info = json.loads(out)
    assert info["budget"] == BUDGET and info["policy"]["dp_required"] is True
    assert [round(j["epsilon"], 2) for j in info["jobs"]] == [9.09] and info["left"] == pytest.approx(BUDGET - 9.0879, abs=1e-3)
