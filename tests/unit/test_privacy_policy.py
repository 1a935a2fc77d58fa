"""The site's privacy policy and its accountant, as pure functions (issue 19)."""

from __future__ import annotations

import warnings

import pytest

from node.accountant import ORDERS, client_level_epsilon, epsilon
from node.db import Database
from node.policy import PrivacyPolicy, job_ask, policy_refusal
from node.privacy_budget import PrivacyLedger
from tests.conftest import require_module

EXTRACTION = {"batch_size": 1, "max_batches": 1, "epochs": 1, "lr": 0.5, "optimizer": "sgd"}
DEMO = {"batch_size": 64, "epochs": 1, "lr": 0.05}


@pytest.mark.parametrize("targs, quorum, rounds, policy, broken", [
    (EXTRACTION, 1, 1, {}, "batch_size 1 is below the minimum 8"),
    ({**EXTRACTION, "batch_size": 8}, 1, 1, {}, "computed from 8 records; the minimum is 32"),
    (DEMO, 1, 5, {"min_quorum": 3}, "quorum 1 is below the minimum of 3"),
    (DEMO, 3, 5, {"dp_required": True}, "requires client-level DP"),
    (DEMO, 3, 5, {"epsilon_budget": 4.0}, "has a privacy budget"),
    ({**DEMO, "dp": {"clip": 1.0, "sigma": 0.1}}, 3, 5, {}, "DP sigma 0.1 is below the minimum 0.5"),
    ({**DEMO, "dp": {"clip": 50.0, "sigma": 1.0}}, 3, 5, {}, "DP clip 50.0 is outside"),
    (DEMO, 3, 5, {}, None),
    ({**DEMO, "dp": {"clip": 1.0, "sigma": 1.0}}, 3, 5, {"dp_required": True, "epsilon_budget": 4.0}, None),
])
def test_the_policy_names_the_rule_a_job_breaks(targs, quorum, rounds, policy, broken):
    refusal = policy_refusal(PrivacyPolicy(**policy), job_ask(rounds, quorum, targs), dataset_rows=600)
    if broken is None:
        assert refusal is None
    else:
        assert refusal is not None and broken in refusal and refusal.startswith("privacy policy: ")


def test_records_per_update_are_capped_by_the_dataset():
    assert "from 20 records" in policy_refusal(PrivacyPolicy(), job_ask(1, 1, DEMO), dataset_rows=20)


def test_per_dataset_overrides():
    policy = PrivacyPolicy(datasets={"icu": {"dp_required": True, "min_batch_size": 32}})
    assert policy.for_dataset("icu").dp_required and policy.for_dataset("icu").min_batch_size == 32
    assert not policy.for_dataset("other").dp_required
    with pytest.raises(ValueError):
        PrivacyPolicy(datasets={"icu": {"min_batch_size": 0}}).for_dataset("icu")


@pytest.mark.parametrize("q, sigma, steps", [(1.0, 1.1, 30), (1.0, 0.7, 5), (0.01, 1.0, 1000), (0.05, 0.8, 200)])
def test_epsilon_equals_opacus_rdp_accountant(q, sigma, steps):
    accountants = require_module("opacus.accountants", "opacus (pip install -e '.[dev]'; `make test` does)")
    reference = accountants.RDPAccountant()
    reference.history = [(sigma, q, steps)]  # (noise multiplier, sample rate, steps): its own record
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the smallest alpha": same orders on both sides
        theirs = reference.get_epsilon(1e-5, alphas=list(ORDERS))
    assert epsilon(q, sigma, steps, 1e-5) == pytest.approx(theirs, rel=1e-9)


def test_two_jobs_on_one_dataset_add_up(tmp_path):
    ledger = PrivacyLedger(Database(tmp_path / "node.db"))
    one = client_level_epsilon(1.0, 5, 1e-5)
    ledger.reserve("cohort", "job-1", one, 1e-5)
    ledger.reserve("cohort", "job-1", one, 1e-5)  # the same job again: counted once
    ledger.reserve("cohort", "job-2", one, 1e-5)
    ledger.reserve("other", "job-3", 9.0, 1e-5)
    spent = ledger.spent("cohort")
    assert spent.jobs == 2 and spent.epsilon == pytest.approx(2 * one) and spent.delta == pytest.approx(2e-5)
    assert one < client_level_epsilon(1.0, 10, 1e-5) < 2 * one + 1e-9  # RDP composes better than summing
