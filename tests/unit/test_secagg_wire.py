"""The job option is validated, and a whole round survives the trip through signed bodies."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from common import codec
from common.messages import AggregatorRef, JobSpec, PlanRef, SecureAggregation
from common.secagg.server import Deadlines, Finished, Publish, ServerSecAgg
from common.secagg.site import SiteSecAgg
from common.secagg.wire import server_state, site_body, site_message, state_body
from tests.unit.secagg_helpers import SITES, config, inputs, plain_sum

OPTION = {"threshold": 3, "neighbours": 4, "clip": 1.0}


def job(rule: str, option=OPTION) -> JobSpec:
    return JobSpec(job_id="j1", owner="r", plan=PlanRef(zoo="mlp"), rounds=1, tags=["t"],
                   aggregator=AggregatorRef(name=rule), secure_aggregation=option)


@pytest.mark.parametrize("rule", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_sum_only_rules_are_allowed(rule):
    assert job(rule).secure_aggregation == SecureAggregation(**OPTION)


@pytest.mark.parametrize("rule", ["fedmedian", "trimmedmean", "krum", "scaffold", "admm"])
def test_rules_that_need_each_update_are_refused_with_the_reason(rule):
    with pytest.raises(ValidationError, match="only the sum"):
        job(rule)


@pytest.mark.parametrize("bad", [{"threshold": 2, "neighbours": 4, "clip": 1.0},
                                 {"threshold": 3, "neighbours": 5, "clip": 1.0},
                                 {"threshold": 3, "neighbours": 4, "clip": 0.0}])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValidationError):
        job("fedavg", bad)


def test_a_round_through_encoded_bodies():
    cfg, data = config(), inputs()
    server = ServerSecAgg(cfg, SITES, Deadlines(1, 2, 3, 4))
    sites = {s: SiteSecAgg(cfg, s, *data[s]) for s in SITES}
    actions = server.start()
    result = None
    while result is None:
        state = next(a.state for a in actions if isinstance(a, Publish))
        wire_state = codec.decode(codec.encode(state_body(1, state, SITES, 9.0).model_dump()))
        state = server_state(type(state_body(1, state, SITES, 9.0)).model_validate(wire_state))
        actions = []
        for s in SITES:
            type_, body = site_body(1, sites[s].on_state(state))
            back = type(body).model_validate(codec.decode(codec.encode(body.model_dump())))
            actions += server.receive(s, site_message(back), 0.0)
        result = next((a.result for a in actions if isinstance(a, Finished)), None)
    ref, _ = plain_sum(data, SITES)
    assert np.abs(result.weighted_sum - ref).max() <= cfg.encoding.sum_error_bound(10)
