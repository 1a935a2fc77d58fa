"""The round end to end in memory: 10 sites, dropouts at every stage, failures with reasons."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg.config import SecAggError
from common.secagg.server import Deadlines, Failed, Ignored, Publish, ServerSecAgg
from common.secagg.simulate import run_round
from common.secagg.site import SiteSecAgg
from common.secagg.stages import MaskedInput, Stage
from tests.unit.secagg_helpers import SITES, config, inputs, plain_sum

CASES = {
    "none": {},
    "one before keys": {"site03": "before_keys"},
    "one after masked input": {"site05": "after_masked"},
    "three at different stages": {"site01": "before_keys", "site04": "before_masked", "site08": "after_masked"},
    "three after keys": {"site02": "before_shares", "site06": "before_masked", "site09": "after_masked"},
}


@pytest.mark.parametrize("drop", CASES.values(), ids=CASES.keys())
def test_sum_of_survivors_within_the_quantisation_bound(drop):
    cfg, data = config(), inputs()
    log = run_round(cfg, data, drop)
    assert log.failure == ""
    # a site that sent its masked input and then dropped is IN the sum
    expect = sorted(s for s in SITES if drop.get(s) in (None, "after_masked"))
    assert list(log.result.included) == expect
    ref, count = plain_sum(data, expect)
    err = np.abs(log.result.weighted_sum - ref).max()
    assert log.result.total_count == count
    assert err <= cfg.encoding.sum_error_bound(len(expect))
    assert log.result.dropped == tuple(sorted(set(SITES) - set(expect)))


def test_complete_graph_secagg_also_works():
    cfg, data = config(threshold=6, neighbours=10), inputs()
    log = run_round(cfg, data, {"site00": "before_masked", "site07": "after_masked"})
    ref, _ = plain_sum(data, [s for s in SITES if s != "site00"])
    assert np.abs(log.result.weighted_sum - ref).max() <= cfg.encoding.sum_error_bound(9)


@pytest.mark.parametrize("point", ["before_keys", "before_shares", "before_masked"])
def test_fewer_than_threshold_survivors_fail_with_a_reason(point):
    cfg = config(threshold=7, neighbours=8)
    drop = {s: point for s in SITES[:4]}  # 6 left, threshold 7
    log = run_round(cfg, inputs(), drop)
    assert log.result is None
    assert "survived" in log.failure and "threshold 7" in log.failure
    assert log.states[-1].stage is Stage.FAILED


def test_too_few_unmask_answers_fail_not_hang():
    cfg = config(threshold=5, neighbours=6)
    drop = {s: "after_masked" for s in SITES[:6]}  # masked inputs from 10, unmask answers from 4
    log = run_round(cfg, inputs(), drop)
    assert log.result is None and "cannot unmask" in log.failure and "threshold 5" in log.failure


def test_unmask_closes_as_soon_as_every_secret_has_t_shares():
    cfg, data = config(), inputs()
    server = ServerSecAgg(cfg, SITES, Deadlines(1, 2, 3, 4))
    sites = {s: SiteSecAgg(cfg, s, *data[s]) for s in SITES}
    state = server.start()[0].state
    for _ in range(3):
        actions = [a for s in SITES for a in server.receive(s, sites[s].on_state(state), 0.0)]
        state = next(a.state for a in actions if isinstance(a, Publish))
    assert state.stage is Stage.UNMASK
    done = []
    for s in SITES:
        done += server.receive(s, sites[s].on_state(state), 0.0)
        if server.finished:
            break
    assert server.state.stage is Stage.DONE and s != SITES[-1]  # did not wait for every answer


def test_the_server_ignores_messages_out_of_stage_and_from_strangers():
    cfg, data = config(), inputs()
    server = ServerSecAgg(cfg, SITES[:9], Deadlines(1, 2, 3, 4))
    stranger = SiteSecAgg(cfg, "site09", *data["site09"])
    got = server.receive("site09", stranger.advertise(), 0.0)
    assert isinstance(got[0], Ignored) and "not awaited" in got[0].reason
    got = server.receive("site00", MaskedInput(np.zeros(cfg.dim + 1, np.uint32)), 0.0)
    assert isinstance(got[0], Ignored) and "stage is keys" in got[0].reason
    assert server.tick(0.5) == [] and server.state.stage is Stage.KEYS
    assert any(isinstance(a, Failed) for a in server.tick(1.0))  # nobody advertised by the deadline


def test_a_site_refuses_a_second_unmask_request_naming_other_survivors():
    cfg = config()
    log = run_round(cfg, inputs(), {"site04": "before_masked"})
    unmask = next(s for s in log.states if s.stage is Stage.UNMASK)
    site = log.sites["site00"]
    assert site.on_state(unmask) is site.on_state(unmask)  # a re-publish gets the same answer
    other = type(unmask)(Stage.UNMASK, unmask.keys, {}, unmask.share_senders,
                         tuple(s for s in unmask.masked_senders if s != "site01"))
    with pytest.raises(SecAggError, match="second unmask"):
        site.on_state(other)


def test_a_site_refuses_unmasking_with_fewer_than_t_survivors():
    cfg = config()
    log = run_round(cfg, inputs(), {})
    unmask = next(s for s in log.states if s.stage is Stage.UNMASK)
    fresh = log.sites["site01"]
    fresh._unmasked_for = None  # as if it had not answered yet
    few = type(unmask)(Stage.UNMASK, unmask.keys, {}, unmask.share_senders, ("site00", "site01"))
    with pytest.raises(SecAggError, match="refused"):
        fresh.on_state(few)


def test_a_restarted_site_with_new_keys_stays_out():
    cfg, data = config(), inputs()
    log = run_round(cfg, data, {})
    shares_state = next(s for s in log.states if s.stage is Stage.SHARES)
    reborn = SiteSecAgg(cfg, "site03", *data["site03"])
    assert reborn.on_state(shares_state) is None


def test_input_of_the_wrong_size_is_refused():
    with pytest.raises(SecAggError, match="expects 257"):
        SiteSecAgg(config(), "site00", np.zeros(3), 1)
