"""The node's SiteRound and the aggregator's ServerRound through signed-body encoding, with a
site killed after sending its masked update: the round ends with the survivors' weighted mean,
its update included. (The broker is replaced by a list of encoded messages; the services do
not run these yet.)"""

from __future__ import annotations

import torch

from aggregators.secagg import ServerRound
from common import codec
from common.messages import AggregatorRef, JobSpec, PlanRef, SecAggState, spec_for
from common.protocol import channel_of
from node.secagg import SiteRound

SITES = ["a", "b", "c", "d", "e"]


def spec() -> JobSpec:
    return JobSpec(job_id="j1", owner="r", plan=PlanRef(zoo="mlp"), rounds=1, tags=["t"],
                   aggregator=AggregatorRef(name="fedavg"),
                   secure_aggregation={"threshold": 3, "neighbours": 4, "clip": 1.0, "max_count": 1000})


def wire(type_: str, body):
    """Encode and decode as the messenger would (without signatures)."""
    return spec_for(type_).model.model_validate(codec.decode(codec.encode(body.model_dump())))


def test_a_round_with_a_site_killed_after_its_masked_update():
    torch.manual_seed(0)
    ref = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    trained = {s: {k: v + 0.1 * torch.randn_like(v) for k, v in ref.items()} for s in SITES}
    counts = dict(zip(SITES, [10, 20, 30, 40, 50], strict=True))
    outbox: list[tuple[str, str, object]] = []
    states: list[SecAggState] = []
    sites = {s: SiteRound(spec(), 1, s, ref, trained[s], counts[s], lambda t, ty, b: outbox.append((t, ty, b)))
             for s in SITES}
    server = ServerRound(spec(), 1, SITES, ref, 0.0, 100.0, lambda st: states.append(wire("secagg_state", st)))
    server.start()
    killed, outcome, seen = "c", None, 0
    while outcome is None:
        for st in states[seen:]:
            seen += 1
            for name, site in sites.items():
                if not (name == killed and st.stage == "unmask"):
                    site.on_state(st)
        for topic, type_, body in outbox:
            sender = channel_of(topic)[1]["node"]
            outcome = server.on_message(sender, wire(type_, body), 1.0) or outcome
        outbox.clear()
        if seen == len(states) and outcome is None:
            outcome = server.tick(100.0)
    assert outcome.reason == "" and outcome.included == tuple(SITES) and outcome.total_count == 150
    for k in ref:
        expect = sum(counts[s] * trained[s][k] for s in SITES) / 150
        assert torch.allclose(outcome.params[k], expect, atol=1e-6)
    assert states[-1].stage == "done"


def test_fewer_than_threshold_sites_fail_the_round_with_the_reason():
    ref = {"w": torch.zeros(2)}
    server = ServerRound(spec(), 1, SITES, ref, 0.0, 10.0, lambda st: None)
    server.start()
    site = SiteRound(spec(), 1, "a", ref, {"w": torch.ones(2)}, 5, lambda t, ty, b: server.on_message("a", b, 0.0))
    site.on_state(SecAggState(round=1, stage="keys", expected=SITES))
    out = server.tick(2.0)  # keys stage over: 1 site, 4 needed
    assert out.params is None and "at least 4 needed" in out.reason
