"""The round's decisions with a fake clock (aggregators/round.py, issue 16): no broker, no sleeps.

A tiny driver plays the JobRunner's part: every `Fold` succeeds unless the scenario says the
update is bad, and the actions are collected in order, so each test reads as a timeline.
"""

from __future__ import annotations

import pytest

from aggregators.round import (
    CHECKPOINT_EVERY_S,
    LULL_S,
    Ack,
    Close,
    Drop,
    Fail,
    Fold,
    Policy,
    Round,
    SaveOpen,
    Standing,
)

T0 = 1000.0
OK = Standing()


def _round(expected=("a", "b", "c"), quorum=2, stragglers="wait", selective=False, deadline_s=60.0) -> Round:
    return Round(1, T0, T0 + deadline_s, Policy(quorum, stragglers, selective), expected=list(expected),
                 eligible=list(expected), last_save=T0, last_event=T0)


def _update(state: Round, node: str, now: float, standing: Standing = OK, bad: str | None = None, round_: int = 1):
    """Deliver one update; perform a Fold as the runner would; all actions in order."""
    out = []
    for action in state.on_update(node, round_, standing):
        out.append(action)
        if isinstance(action, Fold):
            out += (state.on_fold_failed(node, bad) if bad else
                    state.on_folded(node, {"node": node, "n_samples": 10}, now))
    return out


def test_quorum_of_answers_closes_when_nobody_is_left_waiting():
    r = _round()
    assert _update(r, "a", T0 + 1) == [Fold("a"), SaveOpen(), Ack("a")]  # > 0.5 s since the last save
    assert r.on_tick(T0 + 1.01) == []
    assert _update(r, "b", T0 + 1.2) == [Fold("b")]  # batched: the next save covers it
    assert r.on_tick(T0 + 1.2 + LULL_S) == [SaveOpen(), Ack("b")]  # a lull: durable, then acknowledged
    assert r.on_tick(T0 + 2) == []  # quorum met but c is still expected (stragglers: wait)
    assert _update(r, "c", T0 + 3) == [Fold("c"), SaveOpen(), Ack("c")]
    assert r.on_tick(T0 + 3) == [Close()]
    assert r.answered == ["a", "b", "c"] and r.missing() == []


def test_persist_before_ack_also_when_the_round_closes():
    r = _round(expected=("a",), quorum=1)
    r.last_save = T0 + 5
    assert _update(r, "a", T0 + 5.1) == [Fold("a")]
    assert r.on_tick(T0 + 5.1) == [SaveOpen(), Ack("a"), Close()]


@pytest.mark.parametrize("stragglers, closes_at", [("quorum", 2.0), ("wait", 60.0)])
def test_straggler_policies(stragglers, closes_at):
    r = _round(stragglers=stragglers)
    _update(r, "a", T0 + 1)
    _update(r, "b", T0 + 2)
    ticks = [t for t in (2.0, 30.0, 59.9, 60.0) if Close() in r.on_tick(T0 + t)]
    assert ticks[0] == closes_at
    assert r.missing() == ["c"]


def test_the_deadline_below_quorum_fails_with_the_reason():
    r = _round(quorum=2)
    _update(r, "a", T0 + 1)
    assert r.on_tick(T0 + 59) == [SaveOpen(), Ack("a")] or r.on_tick(T0 + 59) == []
    actions = r.on_tick(T0 + 60)
    assert actions[-1] == Fail("round 1: 1 update(s) by the deadline, quorum is 2")
    assert r.on_tick(T0 + 61) == []  # ended: nothing more


def test_every_remaining_node_failing_ends_the_round_early():
    r = _round(quorum=2)
    _update(r, "a", T0 + 1)
    r.on_dropout("b", "failed")
    r.on_dropout("c", "declined")
    assert r.on_tick(T0 + 2)[-1] == Fail(  # not at the deadline: nobody left could answer, and it says so
        "round 1: 1 update(s), quorum is 2, and no node is left to wait for: b, c declined the job or "
        "failed (their reasons are in the job's events)")


def test_an_offline_node_is_still_awaited_if_it_may_come_back():
    r = _round(quorum=1, expected=("a", "b"))
    _update(r, "a", T0 + 1)
    r.on_dropout("b", "offline")
    assert r.on_tick(T0 + 2)[-1] == Close()  # b is gone: nobody to wait for
    r2 = _round(quorum=2, expected=("a", "b"))
    _update(r2, "a", T0 + 1)
    r2.on_dropout("b", "offline")
    r2.on_join("b", OK)  # back online: waited for again
    assert r2.on_tick(T0 + 2) in ([], [SaveOpen(), Ack("a")])
    assert _update(r2, "b", T0 + 3)[0] == Fold("b")


@pytest.mark.parametrize("selective, standing, folded", [
    (False, Standing(eligible=True), True),  # all / at_least: a late eligible node joins
    (False, Standing(eligible=False), False),  # an enrolled node outside the job: refused
    (False, Standing(eligible=True, declined=True), False),
    (False, Standing(eligible=True, pending=True), False),
    (True, Standing(eligible=True), False),  # fraction: only the drawn nodes
])
def test_late_joins_by_selection_mode(selective, standing, folded):
    r = _round(expected=("a", "b"), selective=selective)
    actions = _update(r, "late", T0 + 1, standing=standing)
    assert (Fold("late") in actions) == folded
    assert ("late" in r.expected) == folded
    if not folded:
        assert isinstance(actions[-1], Drop) and "not selected" in actions[-1].reason


@pytest.mark.parametrize("selective, joins", [(False, True), (True, False)])
def test_a_join_event_adds_a_node_unless_the_selection_draws(selective, joins):
    r = _round(expected=("a",), selective=selective)
    r.on_join("b", OK)
    assert ("b" in r.expected) == joins
    r.on_join("c", Standing(pending=True))
    assert "c" not in r.expected


def test_duplicates_late_updates_and_refused_nodes():
    r = _round()
    assert _update(r, "a", T0 + 1)[:1] == [Fold("a")]
    assert _update(r, "a", T0 + 1.1) == [Ack("a")]  # durable already: acknowledged again
    assert _update(r, "b", T0 + 1.2) == [Fold("b")]
    assert _update(r, "b", T0 + 1.25) == []  # folded, not yet durable: no early acknowledgement
    assert _update(r, "c", T0 + 1.3, round_=0) == [Drop("c", "update for round 0, round 1 is open")]
    assert _update(r, "c", T0 + 1.4, bad="c: contains NaN or Inf") == [Fold("c"), Drop("c", "c: contains NaN or Inf")]
    assert _update(r, "c", T0 + 1.5) == [Drop("c", "an earlier update of the round was rejected")]
    assert r.rejected == {"c": "c: contains NaN or Inf"} and "c" in r.failed


def test_batches_are_bounded_in_time():
    r = _round(expected=[f"n{i}" for i in range(10)], quorum=10)
    saves = []
    for i in range(10):
        t = T0 + 0.2 * (i + 1)  # a steady stream: never a lull
        saves += [t for a in _update(r, f"n{i}", t) if a == SaveOpen()]
    gaps = [b - a for a, b in zip([T0, *saves], saves, strict=False)]
    assert saves and max(gaps) <= CHECKPOINT_EVERY_S + 0.2 + 1e-9


@pytest.mark.parametrize("step", range(6))
def test_a_round_resumed_from_its_checkpoint_at_any_step_ends_the_same(step):
    """Run a scripted round; checkpoint it after `step` events (as SaveOpen would), resume a
    new Round from that checkpoint and replay the rest: same folds, same end."""
    script = [("update", "a", 1.0), ("dropout", "b", 2.0), ("update", "c", 3.0, "bad"), ("join", "b", 4.0),
              ("update", "b", 5.0), ("update", "d", 6.0)]

    def play(r: Round, events) -> list:
        """As the runner does: tick, take the event, tick again after a lull (durable)."""
        out = []
        for ev in events:
            kind, node, t = ev[:3]
            out += r.on_tick(T0 + t)
            if kind == "update":
                out += _update(r, node, T0 + t, bad=("refused" if len(ev) > 3 else None))
            elif kind == "dropout":
                out += r.on_dropout(node, "offline")
            else:
                out += r.on_join(node, OK)
            out += r.on_tick(T0 + t + LULL_S)
        return out

    whole = _round(expected=("a", "b", "c"), quorum=2)
    play(whole, script)
    whole.on_tick(T0 + 100)
    first = _round(expected=("a", "b", "c"), quorum=2)
    play(first, script[:step])  # the first part: everything folded is durable after its lull
    resumed = Round.from_dict(first.to_dict(), first.policy, T0 + 7)
    play(resumed, script[step:])
    resumed.on_tick(T0 + 100)
    assert resumed.answered == whole.answered and resumed.rejected == whole.rejected
    assert resumed.missing() == whole.missing() and resumed.ended and whole.ended


def test_the_checkpoint_keeps_who_failed_so_a_resumed_round_can_end_early():
    r = _round(quorum=2)
    _update(r, "a", T0 + 1)
    r.on_dropout("b", "failed")
    r.on_dropout("c", "declined")
    resumed = Round.from_dict(r.to_dict(), r.policy, T0 + 2)
    assert resumed.failed == {"b", "c"}
    assert isinstance(resumed.on_tick(T0 + 2)[-1], Fail)
