"""The node's SecureRounds (node/secagg.py) against a ServerRound: key stages run before the
input exists (while the site trains), a masked answer lost with the link is re-sent after the
reconnect, round 2 opens at its masked stage with the keys carried and the shares made ahead in
round 1 (a node that reads that state late, after a reconnect, still answers it), and options a
node cannot honour are refused."""

from __future__ import annotations

import torch

from aggregators.secagg import ServerRound
from common.messages import AggregatorRef, JobSpec, PlanRef, SecAggState
from common.protocol import channel_of
from node.secagg import SecureRounds, secure_refusal

SITES = ["a", "b", "c", "d"]


def spec(rounds: int = 1, **training_args) -> JobSpec:
    return JobSpec(job_id="j1", owner="r", plan=PlanRef(zoo="mlp"), rounds=rounds, tags=["t"],
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


def test_round_two_opens_at_masked_with_carried_keys_and_early_shares_and_a_late_reader_still_answers():
    job, ref = spec(rounds=2), {"w": torch.zeros(6)}
    states: list[SecAggState] = []
    current: dict[str, ServerRound] = {}
    done = []

    def send_for(name):
        return lambda topic, type_, body: done.append(current["server"].on_message(name, body, 1.0))

    nodes = {s: SecureRounds(s, send_for(s)) for s in SITES}

    def deliver(names=SITES):
        st = states[-1]
        for s in names:
            nodes[s].on_state("j1", st)

    def train(round_):
        for i, s in enumerate(SITES):
            assert nodes[s].set_input("j1", round_, {"w": torch.full((6,), 0.1 * (i + 1))}, 10)

    current["server"] = first = ServerRound(job, 1, SITES, ref, 0.0, 100.0, states.append)
    first.start()
    for n in nodes.values():
        n.open(job, 1, ref)
    deliver(), deliver(), deliver()  # keys, shares, masked (nothing to say before training)
    train(1)
    deliver()  # unmask: the answers, then each node's shares for round 2 (the state lists the carried keys)
    assert [st.stage for st in states] == ["keys", "shares", "masked", "unmask"]  # "done": the job's last round only
    assert sorted(first.next_keys) == SITES and sorted(states[3].next_keys) == SITES
    assert sorted(first.early) == SITES and {b.round for b in first.early.values()} == {2}
    current["server"] = second = ServerRound(job, 2, SITES, ref, 0.0, 100.0, states.append,
                                             carried=first.next_keys, early=first.early)
    second.start()
    assert (states[-1].round, states[-1].stage) == (2, "masked")  # no key and no shares round trip
    for n in nodes.values():
        n.open(job, 2, ref)  # the round's model arrived after the retained masked state
    deliver(SITES[1:])  # "a" is offline when the state is published
    train(2)
    assert states[-1].stage == "masked"
    deliver(["a"])  # it reconnects and reads the retained state: its boxes, made for its early shares
    assert [st.stage for st in states[4:]] == ["masked", "unmask"]
    deliver()
    assert done[-1].included == tuple(SITES) and second.next_keys == {}  # the job's last round carries none
    assert torch.allclose(done[-1].params["w"], torch.full((6,), 0.25), atol=1e-6)


def test_a_node_that_carried_no_keys_into_a_round_sends_its_keys_at_once():
    sent = []
    node = SecureRounds("a", lambda topic, type_, body: sent.append((type_, body.round)))
    node.open(spec(rounds=3), 1, {"w": torch.zeros(6)})
    assert sent == []  # round 1: the key stage asks
    node.open(spec(rounds=3), 2, {"w": torch.zeros(6)})  # a restarted node: round 1 is not here
    assert sent == [("secagg_keys", 2)]
