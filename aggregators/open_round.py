"""The open round's checkpoint, written incrementally: O(what changed) per save, not O(round).

The open round is checkpointed every 256 folded updates or 0.5 s (aggregators/round.py), and
its state holds every folded node's report and every expected node's name: rewritten whole at
each save, a 10,000-node round cost O(N^2/256) (11% of the aggregator's CPU, docs/performance.md).
What only grows within a round (the expected, eligible and answered nodes, the reports) goes
to an append-only journal, `open.journal` (msgpack frames: no pickle); the rest (the rule's
sums, who is gone, failed, rejected, declined, pending, a secure round's stage) to `open.pt`,
replaced atomically at each save after the journal's append, and naming how many of the
journal's bytes it covers. A crash mid-append leaves bytes the head does not cover: ignored on
load, overwritten by the next append. A state that is not an extension of what the journal
holds (a new round, a take-over's state, a restarted process) rewrites the journal whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

GROWING = ("expected", "eligible", "answered", "reports")  # journaled; the rest goes to the head


@dataclass
class _Written:
    """What the journal of one job's open round holds (so the next save appends only the rest)."""

    round: int
    opened: float
    eligible: int
    expected: int
    answered: int
    last_expected: str | None
    last_answered: str | None
    size: int  # bytes of the journal covered by the head

    @classmethod
    def of(cls, state: dict[str, Any], size: int) -> _Written:
        expected, answered = state["expected"], state["answered"]
        return cls(int(state["round"]), float(state["opened"]), len(state["eligible"]), len(expected), len(answered),
                   expected[-1] if expected else None, answered[-1] if answered else None, size)

    def extended_by(self, state: dict[str, Any]) -> bool:
        """Whether `state` holds what was written, with only additions since (O(1) checks: the
        round's lists only grow, so equal length and last name mean the same prefix)."""
        expected, answered = state["expected"], state["answered"]
        return (int(state["round"]) == self.round and float(state["opened"]) == self.opened
                and len(state["eligible"]) == self.eligible and len(state["reports"]) == len(answered)
                and len(expected) >= self.expected and len(answered) >= self.answered
                and (expected[self.expected - 1] if self.expected else None) == self.last_expected
                and (answered[self.answered - 1] if self.answered else None) == self.last_answered)


class OpenRoundStore:
    """`open.pt` (head) and `open.journal` per job folder; one writer per job (its JobRunner)."""

    def __init__(self) -> None:
        self._written: dict[Path, _Written] = {}  # folder -> its journal's content

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        """Append what `state` adds to the journal (or rewrite it), then replace the head."""
        folder.mkdir(parents=True, exist_ok=True)
        journal = folder / "open.journal"
        before = self._written.pop(folder, None)
        if before is not None and before.extended_by(state) and journal.exists():
            frame = {"expected": state["expected"][before.expected:], "answered": state["answered"][before.answered:],
                     "reports": state["reports"][before.answered:]}
            with open(journal, "r+b") as f:
                f.seek(before.size)
                f.truncate()  # whatever a crashed append left past the covered bytes
                f.write(msgpack.packb(frame, use_bin_type=True))
                size = f.tell()
        else:
            first = {"round": int(state["round"]), "opened": float(state["opened"]),
                     **{k: list(state[k]) for k in GROWING}}
            tmp = folder / "open.journal.tmp"
            tmp.write_bytes(msgpack.packb(first, use_bin_type=True))
            tmp.replace(journal)
            size = journal.stat().st_size
        head = {k: v for k, v in state.items() if k not in GROWING}
        head["journal"] = {"bytes": size, "round": int(state["round"]), "opened": float(state["opened"])}
        tmp = folder / "open.pt.tmp"
        torch.save(head, tmp)
        tmp.replace(folder / "open.pt")
        self._written[folder] = _Written.of(state, size)

    def load(self, folder: Path) -> dict[str, Any] | None:
        """The last saved state, whole (as `save` was given it); None if there is none."""
        path = folder / "open.pt"
        if not path.exists():
            return None
        head = torch.load(path, weights_only=True)
        covered = head.pop("journal", None)
        if covered is None:  # written whole by an earlier version
            return head
        self._written.pop(folder, None)  # the next save rewrites the journal: nothing assumed
        data = (folder / "open.journal").read_bytes()[: covered["bytes"]]
        frames = list(msgpack.Unpacker(io.BytesIO(data), raw=False, max_buffer_size=max(len(data), 1)))
        first = frames[0] if frames else {}
        if first.get("round") != covered["round"] or first.get("opened") != covered["opened"]:
            raise ValueError(f"{folder / 'open.journal'} is not the journal of the open round its head names")
        state = {**head, **{k: list(first[k]) for k in GROWING}}
        for frame in frames[1:]:
            for k in ("expected", "answered", "reports"):
                state[k].extend(frame[k])
        return state

    def clear(self, folder: Path) -> None:
        self._written.pop(folder, None)
        (folder / "open.pt").unlink(missing_ok=True)
        (folder / "open.journal").unlink(missing_ok=True)
