"""Keys carried to the next round (common/secagg/site.py, server.py): a site's masked input of
round r carries the public keys of fresh pairs for round r + 1, so round r + 1 opens at its
shares stage; and once round r's unmask state lists the carried keys, sites share ahead for
round r + 1, which then opens at its masked stage (two broker round trips, not four). What must
stay true: the sum, fresh keys per round, the dropout rules when a site did not carry keys (it
dropped in round r) or lost them (it restarted between rounds), and early shares used only
when round r + 1's sites are exactly those they were made for."""

from __future__ import annotations

import numpy as np

from common.secagg.server import Deadlines, Ignored, Publish, ServerSecAgg
from common.secagg.simulate import run_round
from common.secagg.site import SiteSecAgg
from common.secagg.stages import ServerState, Stage
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


def shared_ahead(log1, who: list[str] | None = None):
    """What the node does on round 1's unmask state (node/secagg.py `share_ahead`): round-2 sites
    with the carried pairs, their shares made for the sites the unmask state lists."""
    listed = log1.states[-2].next_keys  # the unmask state
    assert log1.states[-2].stage is Stage.UNMASK and listed == log1.next_keys
    sites = {s: SiteSecAgg(config(round_=2), s, pairs=log1.sites[s].next_pairs) for s in (who or SITES)}
    early = {s: site.on_state(ServerState(Stage.SHARES, keys=listed)) for s, site in sites.items()}
    return sites, early


def test_with_shares_made_ahead_a_steady_round_opens_at_its_masked_stage_two_round_trips():
    log1 = first_round()
    sites, early = shared_ahead(log1)
    log2 = run_round(config(round_=2), inputs(seed=2), ahead=sites, carried=log1.next_keys, early=early)
    assert [s.stage for s in log2.states] == [Stage.MASKED, Stage.UNMASK, Stage.DONE]
    assert_sum_of(log2, SITES)


def test_a_site_that_did_not_share_ahead_is_awaited_in_the_shares_stage():
    log1 = first_round()
    sites, early = shared_ahead(log1)
    del early["site07"]  # its early shares were lost: it answers the published shares stage instead
    log2 = run_round(config(round_=2), inputs(seed=2), ahead=sites, carried=log1.next_keys, early=early)
    assert [s.stage for s in log2.states] == [Stage.SHARES, Stage.MASKED, Stage.UNMASK, Stage.DONE]
    assert_sum_of(log2, SITES)


def test_early_shares_for_other_sites_are_not_used_and_not_repeated():
    log1 = first_round()
    sites, early = shared_ahead(log1)
    nine = [s for s in SITES if s != "site09"]  # round 2 selects nine of the ten its shares were for
    data = {s: v for s, v in inputs(seed=2).items() if s in nine}
    carried = {s: log1.next_keys[s] for s in nine}
    log2 = run_round(config(round_=2), data, pairs={s: log1.sites[s].next_pairs for s in nine},
                     carried=log1.next_keys, early=early)
    assert [s.stage for s in log2.states][:2] == [Stage.SHARES, Stage.MASKED]  # shared again, for the nine
    assert log2.failure == "" and list(log2.result.included) == nine
    state = ServerState(Stage.SHARES, keys=carried)
    assert sites["site00"].on_state(state) is None  # a site made ahead never answers other participants


def test_the_shares_stage_is_silent_until_the_last_early_shares_or_its_grace_time():
    log1 = first_round()
    sites, early = shared_ahead(log1)
    late = early.pop("site04")  # still on its way when the round opens
    server = ServerSecAgg(config(round_=2), SITES, Deadlines(10, 20, 30, 40), log1.next_keys, early)
    assert server.start(now=0.0) == [] and server.state.stage is Stage.SHARES  # nothing published
    assert server.tick(1.0) == []  # within SILENT_SHARES of the stage's 20 s
    [published] = server.receive("site04", late, 1.5)  # the last one: straight to the masked stage
    assert isinstance(published, Publish) and published.state.stage is Stage.MASKED
    server = ServerSecAgg(config(round_=2), SITES, Deadlines(10, 20, 30, 40), log1.next_keys, early)
    server.start(now=0.0)
    [published] = server.tick(2.0)  # its grace time: published for the missing site to answer
    assert isinstance(published, Publish) and published.state.stage is Stage.SHARES
    assert server.receive("site04", sites["site04"].on_state(published.state), 2.5)[0].state.stage is Stage.MASKED


def test_shares_made_for_other_sites_are_refused_whenever_they_arrive():
    """Shares made ahead for the ten sites that carried keys reach a round of nine (late, while
    its shares stage is open): taken, their boxes would hand neighbours shares of a self-mask
    seed the site does not use in that round, and the sum would come out wrong."""
    log1 = first_round()
    _, early = shared_ahead(log1)
    nine = [s for s in SITES if s != "site09"]
    server = ServerSecAgg(config(round_=2), nine, Deadlines(10, 20, 30, 40), log1.next_keys)
    assert server.start(now=0.0)[0].state.stage is Stage.SHARES
    [ignored] = server.receive("site00", early["site00"], 1.0)
    assert isinstance(ignored, Ignored) and "other participants" in ignored.reason


def test_a_site_that_lost_its_carried_keys_says_so_and_the_shares_stage_does_not_wait_for_it():
    log1 = first_round()
    _, early = shared_ahead(log1)
    del early["site05"]  # restarted between rounds: no early shares, and new keys
    server = ServerSecAgg(config(round_=2), SITES, Deadlines(10, 20, 30, 40), log1.next_keys, early)
    assert server.start(now=0.0) == []  # silent: waiting for site05's early shares
    again = server.receive("site05", log1.next_keys["site05"], 0.5)  # its carried keys: nothing changes
    assert isinstance(again[0], Ignored) and server.state.stage is Stage.SHARES
    [published] = server.receive("site05", SiteSecAgg(config(round_=2), "site05").advertise(), 1.0)
    assert isinstance(published, Publish) and published.state.stage is Stage.MASKED  # at once, not at 20 s
    assert "site05" not in published.state.share_senders and len(published.state.share_senders) == 9
