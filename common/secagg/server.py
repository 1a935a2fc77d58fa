"""The server's side of a round, as a pure state machine: messages and ticks in, actions out.

Each stage collects until everyone it waits for answered or its deadline passed (`tick(now)`),
then either publishes the next stage or fails with the reason: never a hang. After the unmask
stage it removes the survivors' self-masks (b_u from shares) and the dropped sites' pairwise
masks (s_sk from shares) and decodes the SUM and the total count. It learns nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.secagg import graph, shamir
from common.secagg.config import SecAggConfig
from common.secagg.encoding import ring_add, ring_sub
from common.secagg.keys import KeyPair
from common.secagg.masks import pair_seed, pairwise_mask, self_mask
from common.secagg.site import share_index
from common.secagg.stages import (
    AdvertiseKeys,
    MaskedInput,
    ServerState,
    ShareKeys,
    SiteMessage,
    Stage,
    UnmaskShares,
)


@dataclass(frozen=True)
class Deadlines:
    """Absolute times (the caller's clock) at which each stage closes."""

    keys: float
    shares: float
    masked: float
    unmask: float

    def of(self, stage: Stage) -> float:
        return getattr(self, stage.value)

    @classmethod
    def split(cls, start: float, end: float) -> Deadlines:
        """Four stages inside [start, end]: keys 20 %, shares 20 %, masked 30 %, unmask 30 %."""
        span = end - start
        return cls(start + 0.2 * span, start + 0.4 * span, start + 0.7 * span, end)


@dataclass(frozen=True)
class SecAggResult:
    weighted_sum: np.ndarray  # sum_u count_u * x_u over `included`, float64
    total_count: int
    included: tuple[str, ...]  # U3: whose input is in the sum
    dropped: tuple[str, ...]  # expected sites whose input is not


@dataclass(frozen=True)
class Publish:
    state: ServerState


@dataclass(frozen=True)
class Finished:
    result: SecAggResult


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Ignored:
    sender: str
    reason: str


Action = Publish | Finished | Failed | Ignored
_EXPECTS: dict[Stage, type] = {Stage.KEYS: AdvertiseKeys, Stage.SHARES: ShareKeys,
                               Stage.MASKED: MaskedInput, Stage.UNMASK: UnmaskShares}


class ServerSecAgg:
    """The aggregator's round; `expected` are the sites selected for it."""

    def __init__(self, config: SecAggConfig, expected: list[str], deadlines: Deadlines) -> None:
        self.config, self.expected, self.deadlines = config, frozenset(expected), deadlines
        self.state = ServerState(Stage.KEYS)
        self._keys: dict[str, AdvertiseKeys] = {}
        self._boxes: dict[str, dict[str, bytes]] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._unmask: dict[str, UnmaskShares] = {}
        self._graph: dict[str, frozenset[str]] = {}

    def start(self) -> list[Action]:
        return [Publish(self.state)]

    @property
    def finished(self) -> bool:
        return self.state.stage in (Stage.DONE, Stage.FAILED)

    def receive(self, sender: str, message: SiteMessage, now: float) -> list[Action]:
        """Take one site's message; close the stage early when everyone awaited answered."""
        stage = self.state.stage
        if self.finished or not isinstance(message, _EXPECTS[stage]):
            return [Ignored(sender, f"{type(message).__name__} while the stage is {stage.value}")]
        if sender not in self._awaited():
            return [Ignored(sender, f"not awaited in stage {stage.value}")]
        problem = self._store(sender, message)
        if problem:
            return [Ignored(sender, problem)]
        if set(self._received()) >= self._awaited() or self._unmask_complete():
            return self._close(now)
        return []

    def tick(self, now: float) -> list[Action]:
        """Close the open stage if its deadline passed."""
        if self.finished or now < self.deadlines.of(self.state.stage):
            return []
        return self._close(now)

    def _awaited(self) -> frozenset[str]:
        s = self.state
        return {Stage.KEYS: self.expected, Stage.SHARES: frozenset(s.keys),
                Stage.MASKED: frozenset(s.share_senders), Stage.UNMASK: frozenset(s.masked_senders)
                }.get(s.stage, frozenset())

    def _received(self) -> dict:
        return {Stage.KEYS: self._keys, Stage.SHARES: self._boxes, Stage.MASKED: self._masked,
                Stage.UNMASK: self._unmask}[self.state.stage]

    def _store(self, sender: str, message: SiteMessage) -> str:
        """Keep a valid message; the reason when it is not."""
        if isinstance(message, MaskedInput):
            v = np.asarray(message.vector)
            if v.dtype != np.uint32 or v.shape != (self.config.dim + 1,):
                return f"masked input of shape {v.shape} {v.dtype}, expected ({self.config.dim + 1},) uint32"
        if isinstance(message, ShareKeys):
            message = ShareKeys({v: b for v, b in message.boxes.items() if v in self._graph[sender]})
        self._received()[sender] = message.vector if isinstance(message, MaskedInput) else message
        return ""

    def _fail(self, reason: str) -> list[Action]:
        self.state = ServerState(Stage.FAILED, reason=reason)
        return [Publish(self.state), Failed(reason)]

    def _close(self, now: float) -> list[Action]:
        stage, got, t = self.state.stage, sorted(self._received()), self.config.threshold
        if stage is Stage.UNMASK:
            return self._finish()
        minimum = t + 1 if stage is Stage.KEYS else t
        if len(got) < minimum:
            return self._fail(f"secure aggregation: {len(got)} sites survived the {stage.value} stage, "
                              f"at least {minimum} needed (threshold {t})")
        if stage is Stage.KEYS:
            self._graph = graph.neighbours(got, self.config.neighbours, self.config.round_seed)
            self.state = ServerState(Stage.SHARES, keys=dict(self._keys))
        elif stage is Stage.SHARES:
            routed: dict[str, dict[str, bytes]] = {v: {} for v in got}
            for u in got:
                for v, box in self._boxes[u].boxes.items():
                    if v in routed:
                        routed[v][u] = box
            self.state = ServerState(Stage.MASKED, keys=self.state.keys, routed=routed, share_senders=tuple(got))
        else:
            self.state = ServerState(Stage.UNMASK, keys=self.state.keys, share_senders=self.state.share_senders,
                                     masked_senders=tuple(got))
        return [Publish(self.state)]

    def _shares_of(self, owner: str, kind: str) -> list[shamir.Share]:
        participants = sorted(self.state.keys)
        out = []
        for holder, answer in sorted(self._unmask.items()):
            y = (answer.b_shares if kind == "b" else answer.s_shares).get(owner)
            if y is not None and holder in self._graph[owner]:
                out.append(shamir.Share.from_bytes(share_index(participants, holder), y))
        return out

    def _unmask_complete(self) -> bool:
        """Every secret the sum needs has T shares already (no need to wait for the rest)."""
        if self.state.stage is not Stage.UNMASK:
            return False
        t, alive = self.config.threshold, set(self.state.masked_senders)
        dropped = set(self.state.share_senders) - alive
        return (all(len(self._shares_of(u, "b")) >= t for u in alive)
                and all(len(self._shares_of(u, "s")) >= t for u in dropped))

    def _finish(self) -> list[Action]:
        try:
            ring_sum = self._unmasked_sum()
        except (shamir.ShamirError, ValueError) as exc:
            return self._fail(f"secure aggregation: cannot unmask: {exc}")
        weighted, count = self.config.encoding.decode_sum(ring_sum)
        included = tuple(sorted(self.state.masked_senders))
        result = SecAggResult(weighted, count, included, tuple(sorted(self.expected - set(included))))
        self.state = ServerState(Stage.DONE, masked_senders=included)
        return [Publish(self.state), Finished(result)]

    def _unmasked_sum(self) -> np.ndarray:
        """Sum of the masked inputs minus survivors' self-masks and dropped sites' pair masks."""
        cfg, t = self.config, self.config.threshold
        alive = list(self.state.masked_senders)
        dropped = sorted(set(self.state.share_senders) - set(alive))
        total = np.zeros(cfg.dim + 1, dtype=np.uint32)
        for u in alive:
            b = self._reconstruct(u, "b", t)
            total = ring_sub(ring_add(total, self._masked[u]), self_mask(b, cfg.dim + 1))
        for u in dropped:
            s_u = KeyPair.from_private_bytes(self._reconstruct(u, "s", t))
            if s_u.public_bytes() != self.state.keys[u].s_pk:
                raise ValueError(f"shares of {u}'s mask key do not match the key it advertised")
            for v in sorted(self._graph[u] & set(alive)):
                seed = pair_seed(cfg.context, s_u, u, self.state.keys[v].s_pk, v)
                total = ring_sub(total, pairwise_mask(seed, v, u, cfg.dim + 1))
        return total

    def _reconstruct(self, owner: str, kind: str, t: int) -> bytes:
        shares = self._shares_of(owner, kind)
        if len(shares) < t:
            what = "self-mask seed" if kind == "b" else "mask key"
            raise ValueError(f"{len(shares)} shares of {owner}'s {what}, threshold {t}")
        return shamir.reconstruct(shares, t)
