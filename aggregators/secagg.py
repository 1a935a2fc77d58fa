"""The aggregator's side of secure aggregation (issue 20): one round of `ServerSecAgg`, whose
unmasked weighted mean the rule then folds as ONE update carrying the total count.

Kept out of aggregators/service.py: the round loop only builds a ServerRound, feeds it the
messages of `jobs/{job}/secagg/+` and its clock, and takes the outcome.

Checkpointed at every stage, before the stage is published (`save`): a restarted aggregator
resumes the round from the last published stage (`resume`), publishes it again, and the sites,
which still hold their keys and repeat their answers, answer it again. Nothing secret is saved:
what the server received (public keys, sealed boxes, masked inputs), which it already holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from common.messages import Body, JobSpec, SecAggShares, SecAggState
from common.secagg.params import Params, round_config, unflatten_mean
from common.secagg.server import Deadlines, Failed, Finished, Ignored, Publish, ServerSecAgg
from common.secagg.stages import AdvertiseKeys, ShareKeys, Stage
from common.secagg.wire import site_message, state_body

SECAGG_SENDER = "secagg"  # the node name the rule sees for the one aggregated update


def pack(snapshot: dict[str, Any]) -> torch.Tensor:
    """A server snapshot as one uint8 tensor for the round's checkpoint (torch.save pickles
    bytes objects slowly; a tensor is written as it is)."""
    return torch.frombuffer(bytearray(msgpack.packb(snapshot, use_bin_type=True)), dtype=torch.uint8)


def unpack(saved: torch.Tensor) -> dict[str, Any]:
    return msgpack.unpackb(saved.numpy().tobytes(), raw=False, strict_map_key=False)


@dataclass(frozen=True)
class Outcome:
    params: Params | None  # the survivors' weighted mean of the parameters; None when it failed
    total_count: int
    included: tuple[str, ...]
    dropped: tuple[str, ...]
    reason: str = ""


class ServerRound:
    """The aggregator's round over `expected` sites, its stages inside [start, deadline]."""

    def __init__(self, spec: JobSpec, round_: int, expected: list[str], reference: Params,
                 start: float, deadline: float, publish: Callable[[SecAggState], None],
                 save: Callable[[torch.Tensor], None] | None = None, resume: torch.Tensor | None = None,
                 now: Callable[[], float] = time.time, carried: dict[str, AdvertiseKeys] | None = None,
                 early: dict[str, Body] | None = None) -> None:
        opt = spec.secure_aggregation
        if opt is None:
            raise ValueError(f"job {spec.job_id} does not use secure aggregation")
        cfg = round_config(spec.job_id, round_, opt.threshold, opt.neighbours, opt.clip, opt.max_count,
                           reference, len(expected))
        self.round, self.expected, self._reference, self._publish = round_, sorted(expected), reference, publish
        self._save, self._now, self._rounds = save or (lambda _: None), now, spec.rounds
        deadlines = Deadlines.split(start, deadline)
        shares = {u: m for u, b in (early or {}).items() if isinstance(m := site_message(b), ShareKeys)}
        self._server = (ServerSecAgg(cfg, self.expected, deadlines, carried, shares) if resume is None else
                        ServerSecAgg.resume(cfg, self.expected, deadlines, unpack(resume), now()))
        self.resumed_at = None if resume is None else self._server.state.stage.value
        self.outcome: Outcome | None = None
        self.ignored: list[tuple[str, str]] = []
        self.early: dict[str, Body] = {}  # shares for the next round, sent during this one's unmask stage

    def start(self) -> None:
        self._act(self._server.start(self._now()))

    @property
    def next_keys(self) -> dict[str, AdvertiseKeys]:
        """The keys the sites carried for the next round in their masked inputs (public; not in
        the checkpoint: after a restart the next round runs its key stage)."""
        return dict(self._server.next_keys)

    def on_message(self, sender: str, body: Body, now: float) -> Outcome | None:
        if isinstance(body, SecAggShares) and body.round == self.round + 1:  # shared ahead for the next round
            self.early[sender] = body
            return self.outcome
        if getattr(body, "round", None) != self.round:
            self.ignored.append((sender, f"round {getattr(body, 'round', None)} is not {self.round}"))
            return self.outcome
        return self._act(self._server.receive(sender, site_message(body), now))

    def tick(self, now: float) -> Outcome | None:
        return self._act(self._server.tick(now))

    def _act(self, actions: list) -> Outcome | None:
        for a in actions:
            if isinstance(a, Publish):
                stage = a.state.stage
                if stage is Stage.DONE and self.round < self._rounds:
                    continue  # the next round's first state follows at once: sites would only read it
                if not self._server.finished:  # persist before publish: a published stage is never lost
                    self._save(pack(self._server.snapshot(self._now())))
                deadline = self._server.deadlines.of(stage) if stage.value in ("keys", "shares", "masked", "unmask") else 0.0
                self._publish(state_body(self.round, a.state, self.expected, deadline))
            elif isinstance(a, Finished):
                r = a.result
                self.outcome = Outcome(unflatten_mean(r.weighted_sum, r.total_count, self._reference),
                                       r.total_count, r.included, r.dropped)
            elif isinstance(a, Failed):
                self.outcome = Outcome(None, 0, (), tuple(self.expected), a.reason)
            elif isinstance(a, Ignored):
                self.ignored.append((a.sender, a.reason))
        return self.outcome
