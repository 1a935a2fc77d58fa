"""Keys carried to the next round (common/secagg/site.py, server.py): a site's masked input of
round r carries the public keys of fresh pairs for round r + 1, so a steady round opens at its
shares stage (three broker round trips, not four). What must stay true: the sum, fresh keys per
round, and the dropout rules when a site did not carry keys (it dropped in round r) or lost
them (it restarted between rounds)."""

from __future__ import annotations

import numpy as np

from common.secagg.simulate import run_round
from common.secagg.stages import Stage
from tests.unit.secagg_helpers import SITES, config, inputs, plain_sum


def first_round(drop: dict[str, str] | None = None):
    log = run_round(config(round_=1), inputs(seed=1), drop, carry=True)
    assert log.failure == ""
    return log


def second_round(log1, drop: dict[str, str] | None = None, lost: tuple[str, ...] = ()):
    """Round 2 with what round 1 carried; sites in `lost` restarted (their pairs are gone)."""
    pairs = {s: None if s in lost else site.next_pairs for s, site in log1.sites.items()}
    return run_round(config(round_=2), inputs(seed=2), drop, pairs=pairs, carried=log1.next_keys)


def assert_sum_of(log, who: list[str]) -> None:
    assert log.failure == "" and list(log.result.included) == sorted(who)
    ref, count = plain_sum(inputs(seed=2), who)
    assert log.result.total_count == count
    assert np.abs(log.result.weighted_sum - ref).max() <= config().encoding.sum_error_bound(len(who))


def test_a_steady_round_opens_at_its_shares_stage_three_round_trips():
    log1 = first_round()
    assert [s.stage for s in log1.states] == [Stage.KEYS, Stage.SHARES, Stage.MASKED, Stage.UNMASK, Stage.DONE]
    assert sorted(log1.next_keys) == SITES  # every masked input carried its sender's next keys
    log2 = second_round(log1)
    assert [s.stage for s in log2.states] == [Stage.SHARES, Stage.MASKED, Stage.UNMASK, Stage.DONE]
    assert_sum_of(log2, SITES)


def test_carried_keys_are_fresh_for_the_next_round_and_are_the_ones_it_uses():
    log1 = first_round()
    log2 = second_round(log1)
    for s in SITES:
        assert log1.next_keys[s] != log1.sites[s].advertise()  # not this round's keys again
        assert log2.sites[s].advertise() == log1.next_keys[s]
        assert log2.states[0].keys[s] == log1.next_keys[s]
    assert log2.next_keys == {}  # nothing carried unless asked (the job's last round)


def test_a_site_that_dropped_in_round_r_gets_a_key_stage_in_round_r_plus_1():
    log1 = first_round({"site03": "before_masked"})  # keys and shares, no masked input: no next keys
    assert "site03" not in log1.next_keys
    log2 = second_round(log1)  # it is back: the key stage waits for it only
    assert [s.stage for s in log2.states][:2] == [Stage.KEYS, Stage.SHARES]
    assert_sum_of(log2, SITES)


def test_a_site_that_stays_away_is_a_dropout_of_the_key_stage_under_the_threshold_rules():
    log1 = first_round({"site03": "before_masked"})
    log2 = second_round(log1, {"site03": "before_keys"})  # the key stage closes at its deadline
    assert_sum_of(log2, [s for s in SITES if s != "site03"])
    log1 = first_round()
    half = {s: k for s, k in log1.next_keys.items() if s in SITES[5:]}  # the others were not in round r
    pairs = {s: site.next_pairs for s, site in log1.sites.items()}
    log2 = run_round(config(round_=2), inputs(seed=2), {s: "before_keys" for s in SITES[:5]}, pairs=pairs,
                     carried=half)  # and they stay away: 5 keys, fewer than T + 1 = 6
    assert log2.states[0].stage is Stage.KEYS
    assert log2.result is None and "5 sites survived the keys stage" in log2.failure, log2.failure


def test_a_site_restarted_between_rounds_drops_out_of_the_next_round_only():
    log1 = first_round()
    log2 = second_round(log1, lost=("site05",))  # the server holds keys whose private half is gone
    assert log2.states[0].stage is Stage.SHARES
    assert "site05" not in log2.states[1].share_senders  # it cannot share for keys it does not hold
    assert_sum_of(log2, [s for s in SITES if s != "site05"])
