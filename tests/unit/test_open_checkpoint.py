"""The open round's checkpoint (aggregators/open_round.py through Checkpoints): each save writes
what changed, not the whole round, and a load gives back exactly the last saved state, after a
torn append or a restart too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aggregators.round import Policy, Round, Standing
from aggregators.service import Checkpoints


def _state(rnd: Round, total: float = 0.0) -> dict:
    """What JobRunner._save_open saves: the round, the rule's sums, the job's standing."""
    return {**rnd.to_dict(), "rule": {"sum": torch.full((3,), total), "count": len(rnd.answered)},
            "declined": ["x"], "pending": []}


def _fold(rnd: Round, node: str, now: float = 1.0) -> None:
    rnd.on_folded(node, {"node": node, "n_samples": 32, "metrics": {"train_loss": 0.25}, "timings": {"train_s": 1e-3}},
                  now)


def _round(n: int) -> Round:
    names = [f"n{i:05d}" for i in range(n)]
    return Round(1, 100.0, 700.0, Policy(quorum=n), expected=list(names), eligible=list(names))


def _disk(folder) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if k == "rule":
            assert torch.equal(a[k]["sum"], b[k]["sum"]) and a[k]["count"] == b[k]["count"]
        else:
            assert a[k] == b[k], k


def test_a_save_writes_what_the_round_added_not_the_whole_round(tmp_path):
    """Red before the journal: each save rewrote every report (O(N) a save, O(N^2/256) a round)."""
    cp = Checkpoints(tmp_path)
    rnd = _round(10_000)
    for i in range(5_000):
        _fold(rnd, f"n{i:05d}")
    cp.save_open("j", _state(rnd))
    before = _disk(tmp_path / "j")
    _fold(rnd, "n05000")
    cp.save_open("j", _state(rnd))
    after = _disk(tmp_path / "j")
    written = after.get("open.journal", 0) - before.get("open.journal", 0) + after["open.pt"]  # appended + replaced
    assert written < 4_000, f"one more report cost {written} bytes of checkpoint"
    _same(cp.load_open("j"), _state(rnd))


def test_saves_through_a_round_load_back_exactly_the_last_one(tmp_path):
    cp = Checkpoints(tmp_path)
    rnd = _round(20)
    for i in range(12):
        _fold(rnd, f"n{i:05d}", now=1.0 + i)
        if i == 4:
            rnd.on_dropout("n00019", "offline")
            rnd.on_fold_failed("n00018", "bad update")
        if i == 6:
            rnd.on_join("late", Standing())
        if i % 3 == 2:
            cp.save_open("j", _state(rnd, total=float(i)))
            _same(cp.load_open("j"), _state(rnd, total=float(i)))
    assert "late" in cp.load_open("j")["expected"]
    _same(Checkpoints(tmp_path).load_open("j"), _state(rnd, total=11.0))  # a restarted process reads it too


def test_a_torn_append_is_ignored_and_overwritten(tmp_path):
    cp = Checkpoints(tmp_path)
    rnd = _round(10)
    for i in range(4):
        _fold(rnd, f"n{i:05d}")
    cp.save_open("j", _state(rnd, 4.0))
    saved = _state(rnd, 4.0)
    with open(tmp_path / "j" / "open.journal", "ab") as f:  # killed mid-append: the head was not replaced
        f.write(b"\x83\xa8expected\x91")
    _same(cp.load_open("j"), saved)
    restarted = Checkpoints(tmp_path)
    resumed = Round.from_dict(restarted.load_open("j"), Policy(quorum=10), 5.0)
    _fold(resumed, "n00004")
    restarted.save_open("j", _state(resumed, 5.0))
    _fold(resumed, "n00005")
    restarted.save_open("j", _state(resumed, 6.0))
    _same(Checkpoints(tmp_path).load_open("j"), _state(resumed, 6.0))


def test_a_new_round_or_a_foreign_state_starts_a_new_journal(tmp_path):
    cp = Checkpoints(tmp_path)
    rnd = _round(10)
    _fold(rnd, "n00001")
    cp.save_open("j", _state(rnd))
    nxt = Round(2, 200.0, 800.0, Policy(quorum=10), expected=["a", "b"], eligible=["a", "b"])
    _fold(nxt, "b")
    cp.save_open("j", _state(nxt))
    _same(cp.load_open("j"), _state(nxt))
    other = {**_state(nxt), "answered": ["a"], "reports": [{"node": "a", "n_samples": 1}]}  # not an extension
    cp.save_open("j", other)
    _same(cp.load_open("j"), other)
    cp.clear_open("j")
    assert cp.load_open("j") is None and not (tmp_path / "j" / "open.journal").exists()


def test_a_head_written_whole_by_an_earlier_version_still_loads(tmp_path):
    rnd = _round(3)
    _fold(rnd, "n00000")
    (tmp_path / "j").mkdir()
    torch.save(_state(rnd), tmp_path / "j" / "open.pt")
    _same(Checkpoints(tmp_path).load_open("j"), _state(rnd))


def test_the_published_history_validates_each_closed_round_once():
    """The researchers' history was rebuilt from every round's dict at each round (O(rounds x
    nodes) a round: 0.24 s at the third round of 10,000 nodes)."""
    from aggregators.service import JobRunner
    from common.messages import NodeRoundReport, RoundClosed

    def closed(r: int) -> dict:
        reports = [NodeRoundReport(node=f"n{i}", n_samples=32, metrics={"loss": 0.1 * r}) for i in range(5)]
        return RoundClosed(round=r, reports=reports, missing=[], metrics={"loss": 0.1 * r}, duration_s=1.0).model_dump()

    runner = SimpleNamespace(_closed=[])
    history = [closed(1)]
    first = JobRunner._history_rounds(runner, history)
    history.append(closed(2))
    both = JobRunner._history_rounds(runner, history)
    assert [r.model_dump() for r in both] == history
    assert both[0] is first[0], "a closed round was validated again"
    assert [r.round for r in JobRunner._history_rounds(runner, [closed(7)])] == [7]  # a shorter history: rebuilt


def test_a_round_closed_here_is_not_validated_again_for_the_history(monkeypatch):
    """The round's own RoundClosed goes into the published history (its 10,000 reports were
    validated again between rounds: ~40 ms while the fleet waited)."""
    from aggregators.service import JobRunner
    from common.messages import NodeRoundReport, RoundClosed

    reports = [NodeRoundReport(node=f"n{i}", n_samples=32, metrics={"loss": 0.1}) for i in range(5)]
    summary = RoundClosed(round=1, reports=reports, missing=[], metrics={"loss": 0.1}, duration_s=1.0)
    runner = SimpleNamespace(_closed=[])
    history: list = []
    JobRunner._note_closed(runner, history, summary)
    monkeypatch.setattr(RoundClosed, "model_validate", classmethod(lambda cls, _: pytest.fail("validated again")))
    assert JobRunner._history_rounds(runner, history) == [summary]
    assert history == [summary.model_dump()]
