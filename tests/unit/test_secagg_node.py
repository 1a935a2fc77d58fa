"""The node's SecureRounds (node/secagg.py) against a ServerRound: key stages run before the
input exists (while the site trains), a masked answer lost with the link is re-sent after the
reconnect, and options a node cannot honour are refused."""

from __future__ import annotations

import torch

from aggregators.secagg import ServerRound
from common.messages import AggregatorRef, JobSpec, PlanRef, SecAggState
from common.protocol import channel_of
from node.secagg import SecureRounds, secure_refusal

SITES = ["a", "b", "c", "d"]


def spec(**training_args) -> JobSpec:
    return JobSpec(job_id="j1", owner="r", plan=PlanRef(zoo="mlp"), rounds=1, tags=["t"],
                   aggregator=AggregatorRef(name="fedavg"), training_args=training_args,
                   secure_aggregation={"threshold": 3, "neighbours": 4, "clip": 1.0, "max_count": 100})


def test_keys_before_training_and_a_lost_masked_answer_is_resent_after_reconnect():
    ref = {"w": torch.zeros(6)}
    states: list[SecAggState] = []
    server = ServerRound(spec(), 1, SITES, ref, 0.0, 100.0, lambda st: states.append(st))
    link = {"up": True}
    outcome = []

    def send_for(name):
        def send(topic, type_, body):
            if not link["up"] and name == "a":
                raise ConnectionError("the broker is away")
            assert channel_of(topic)[1]["node"] == name
            outcome.append(server.on_message(name, body, 1.0))
        return send

    nodes = {s: SecureRounds(s, send_for(s)) for s in SITES}
    server.start()
    for n in nodes.values():
        n.open(spec(), 1, ref)  # the round's model arrived: training starts
    for _ in range(3):  # keys, then shares: answered with no input yet; masked: nothing to say yet
        st = states[-1]
        for n in nodes.values():
            n.on_state("j1", st)
    assert states[-1].stage == "masked" and len(outcome) == 8
    link["up"] = False
    for i, n in enumerate(nodes.values()):  # training ends; a's masked answer is lost
        assert n.set_input("j1", 1, {"w": torch.full((6,), 0.1 * (i + 1))}, 10)
    assert states[-1].stage == "masked"
    link["up"] = True
    nodes["a"].resend()  # on reconnect
    assert states[-1].stage == "unmask"
    for n in nodes.values():
        n.on_state("j1", states[-1])
    done = [o for o in outcome if o is not None][-1]
    assert done.included == tuple(SITES)
    assert torch.allclose(done.params["w"], torch.full((6,), 0.25), atol=1e-6)


def test_a_node_refuses_what_it_cannot_mask():
    assert secure_refusal(spec()) is None
    assert "compression" in secure_refusal(spec(compression={"kind": "int8"}))
    assert "scaffold" in secure_refusal(spec(algorithm="scaffold"))
