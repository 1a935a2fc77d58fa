"""Chaos during secure aggregation (issue 20): the aggregator SIGKILLed in the middle of a
secure round and restarted, the broker hard-killed and restarted during one. 3 real nodes,
k = 2, T = 2 (the complete graph; no site may drop, so every fault here must be survived by
resuming, not by losing a site). The fault-free secure run is the baseline: the sum is exact
integer arithmetic in the ring, so a resumed run ends with the bit-identical model.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import NODES, run_job, same_params

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(600)]  # a fault-free baseline job too
ROUNDS = 3
SECAGG = {"threshold": 2, "neighbours": 2, "clip": 1.0, "max_count": 1000}


def masked(r: int):
    return lambda m: m.type == "secagg_masked" and m.round == r


def _every_round_has_every_site(state) -> None:
    assert state.status == "done", state.reason
    assert [h["notes"]["secure_aggregation"]["included"] for h in state.history] == [NODES] * ROUNDS


@pytest.fixture(scope="module")
def baseline():
    state, _ = run_job(rounds=ROUNDS, secure_aggregation=SECAGG)
    _every_round_has_every_site(state)
    return state


def test_aggregator_sigkilled_in_the_masked_stage_resumes_the_secure_round(baseline):
    def fault(run):
        run.wait_event(masked(2))  # the first masked input of round 2 is on its way
        run.kill(run.agg_proc())
        run.fed.start_aggregator("fedavg-1")

    state, run = run_job(fault, rounds=ROUNDS, secure_aggregation=SECAGG)
    _every_round_has_every_site(state)
    assert same_params(state.params, baseline.params), "final model differs from the fault-free secure run"
    log = run.logs["agg-fedavg-1"]
    assert '"secure_round_resumed"' in log, "the restarted aggregator did not resume the secure round"


@pytest.mark.parametrize("hard", [False, True], ids=["SIGTERM", "SIGKILL"])
def test_broker_restarted_during_a_secure_round(baseline, hard):
    def fault(run):
        run.wait_event(masked(2))
        run.restart_broker(hard=hard)

    t0 = time.monotonic()
    state, run = run_job(fault, rounds=ROUNDS, secure_aggregation=SECAGG)
    print(f"job ended {state.status} in {time.monotonic() - t0:.1f} s: {state.reason}")
    _every_round_has_every_site(state)
    assert same_params(state.params, baseline.params)
    assert run.logs["broker"].count("mosquitto version 2.0.11 starting") == 2
