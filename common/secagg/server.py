"""The server's side of a round, as a pure state machine: messages and ticks in, actions out.

Each stage collects until everyone it waits for answered or its deadline passed (`tick(now)`),
then either publishes the next stage or fails with the reason: never a hang. The key stage
needs no round trip when every expected site carried its keys in the last round's masked
input. After the unmask stage it removes the survivors' self-masks (b_u from shares) and the
dropped sites' pairwise masks (s_sk from shares) and decodes the SUM and the total count. It
learns nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from common.secagg import graph, shamir
from common.secagg.config import SecAggConfig
from common.secagg.keys import KeyPair
from common.secagg.masks import add_mask, pair_seed, pair_sign
from common.secagg.site import share_index
from common.secagg.stages import (
    AdvertiseKeys,
    MaskedInput,
    ServerState,
    ShareKeys,
    SiteMessage,
    Stage,
    UnmaskShares,
    participants_digest,
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

    def shifted(self, by: float) -> Deadlines:
        return replace(self, keys=self.keys + by, shares=self.shares + by, masked=self.masked + by,
                       unmask=self.unmask + by)


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
SILENT_SHARES = 0.1  # of the shares stage's time: how long it waits for early shares unpublished
_EXPECTS: dict[Stage, type] = {Stage.KEYS: AdvertiseKeys, Stage.SHARES: ShareKeys,
                               Stage.MASKED: MaskedInput, Stage.UNMASK: UnmaskShares}


class ServerSecAgg:
    """The aggregator's round; `expected` are the sites selected for it."""

    def __init__(self, config: SecAggConfig, expected: list[str], deadlines: Deadlines,
                 carried: dict[str, AdvertiseKeys] | None = None, early: dict[str, ShareKeys] | None = None) -> None:
        """`carried`: public keys for this round that sites sent with their last round's masked
        input; when every expected site carried them, the round opens at its shares stage.
        `early`: shares for this round that sites sent during the last round's unmask stage,
        computed over all of `carried` (published in that unmask state): used when the expected
        sites are exactly those, and then the round opens at its masked stage."""
        self.config, self.expected, self.deadlines = config, frozenset(expected), deadlines
        self._carried_from, self._early = frozenset(carried or {}), dict(early or {})
        self._silent_until: float | None = None  # a shares stage not published (yet): see start
        self._lost: set[str] = set()  # sites that lost the keys they carried (see receive)
        self.state = ServerState(Stage.KEYS)
        self._keys: dict[str, AdvertiseKeys] = {u: k for u, k in (carried or {}).items() if u in self.expected}
        self.next_keys: dict[str, AdvertiseKeys] = {}  # carried in this round's masked inputs, for the next
        self._boxes: dict[str, dict[str, bytes]] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._masked_sum: np.ndarray | None = None  # sum of U3's masked inputs: all the server keeps of them
        self._unmask: dict[str, UnmaskShares] = {}
        self._graph: dict[str, frozenset[str]] = {}
        self._share_count: dict[tuple[str, str], int] = {}  # (owner, "b" | "s") -> valid shares held

    def start(self, now: float = 0.0) -> list[Action]:
        """The current stage, published (again, after a resume: the sites answer it again). With
        every expected site's keys carried from the last round, the key stage closes at once (no
        round trip); otherwise it waits for the others (carried keys count as answers). If the
        sites are exactly those asked to share ahead (round r's unmask state), the shares stage
        takes their early shares and is not published: it closes when the last early shares
        come (`receive`), or is published after SILENT_SHARES of its time for the missing."""
        if not (self.state.stage is Stage.KEYS and self._keys and set(self._keys) >= self.expected):
            return [Publish(self.state)]
        actions = self._close(now)  # -> shares
        if self.state.stage is not Stage.SHARES or self._carried_from != self.expected:
            return actions
        # every site was asked to share ahead: the shares stage is silent while their shares come
        for sender, shares in sorted(self._early.items()):
            if sender in self._awaited():
                self._store(sender, shares)
        if set(self._boxes) >= self._awaited():
            return self._close(now)
        self._silent_until = now + SILENT_SHARES * max(0.0, self.deadlines.shares - now)
        return []

    def snapshot(self, now: float) -> dict[str, Any]:
        """What a restarted server needs to go on from the stage it last published, as plain data
        (bytes, lists, dicts): that state and, from the unmask stage on, the ring sum of the
        masked inputs (one vector, not one per site). The open stage's messages are not in it:
        the sites answer the re-published state again (a site repeats its answer to a stage, so
        a resumed round is the same round)."""
        s = self.state
        return {"stage": s.stage.value, "keys": {u: [k.c_pk, k.s_pk] for u, k in s.keys.items()},
                "routed": s.routed, "share_senders": list(s.share_senders), "masked_senders": list(s.masked_senders),
                "reason": s.reason, "saved_at": now,
                "masked_sum": b"" if self._masked_sum is None else self._masked_sum.tobytes()}

    @classmethod
    def resume(cls, config: SecAggConfig, expected: list[str], deadlines: Deadlines, snap: dict[str, Any],
               now: float) -> ServerSecAgg:
        """The server of `snapshot`; its stage deadlines moved by the time it was down (the open
        stage gets back the time it had left when it was saved)."""
        server = cls(config, expected, deadlines.shifted(max(0.0, now - float(snap["saved_at"]))))
        keys = {u: AdvertiseKeys(bytes(c), bytes(s)) for u, (c, s) in snap["keys"].items()}
        server.state = ServerState(Stage(snap["stage"]), keys=keys, routed={r: dict(b) for r, b in snap["routed"].items()},
                                   share_senders=tuple(snap["share_senders"]),
                                   masked_senders=tuple(snap["masked_senders"]), reason=snap["reason"])
        if keys:
            server._graph = graph.neighbours(sorted(keys), config.neighbours, config.round_seed)
        if snap["masked_sum"]:
            server._masked_sum = np.frombuffer(snap["masked_sum"], dtype=np.uint32).copy()
        return server

    @property
    def finished(self) -> bool:
        return self.state.stage in (Stage.DONE, Stage.FAILED)

    def receive(self, sender: str, message: SiteMessage, now: float) -> list[Action]:
        """Take one site's message; close the stage early when everyone awaited answered."""
        stage = self.state.stage
        if stage is Stage.SHARES and isinstance(message, AdvertiseKeys) and sender in self._awaited():
            return self._lost_keys(sender, message, now)
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

    def _lost_keys(self, sender: str, keys: AdvertiseKeys, now: float) -> list[Action]:
        """Keys other than those this round holds for `sender` (carried from the last round):
        it lost the pairs (a restart) and cannot share for them, so the shares stage stops
        waiting for it (a drop-out of this round, back in the next); its own keys again: nothing."""
        if keys == self.state.keys.get(sender):
            return [Ignored(sender, "the keys this round already holds")]
        self._lost.add(sender)
        if set(self._received()) >= self._awaited():
            return self._close(now)
        return [Ignored(sender, "keys lost since the last round: not awaited in this shares stage")]

    def tick(self, now: float) -> list[Action]:
        """Close the open stage if its deadline passed; publish a silent shares stage whose
        early shares did not all come in time (the missing sites answer it as usual)."""
        if self._silent_until is not None and now >= self._silent_until and self.state.stage is Stage.SHARES:
            self._silent_until = None
            return [Publish(self.state)]
        if self.finished or now < self.deadlines.of(self.state.stage):
            return []
        return self._close(now)

    def _awaited(self) -> frozenset[str]:
        s = self.state
        return {Stage.KEYS: self.expected, Stage.SHARES: frozenset(s.keys) - self._lost,
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
            if message.made_for != participants_digest(self.state.keys):
                return "shares made for other participants than this round's"
            message = ShareKeys({v: b for v, b in message.boxes.items() if v in self._graph[sender]})
        if isinstance(message, UnmaskShares) and sender not in self._unmask:
            self._count_shares(sender, message)
        if isinstance(message, MaskedInput) and message.next_keys is not None:
            self.next_keys[sender] = message.next_keys
        self._received()[sender] = message.vector if isinstance(message, MaskedInput) else message
        return ""

    def _count_shares(self, holder: str, answer: UnmaskShares) -> None:
        """Keep a count per secret of the shares that will count (held by a neighbour of its owner)."""
        for kind, shares in (("b", answer.b_shares), ("s", answer.s_shares)):
            for owner in shares:
                if holder in self._graph.get(owner, ()):
                    self._share_count[(owner, kind)] = self._share_count.get((owner, kind), 0) + 1

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
            self._masked_sum = np.zeros(self.config.dim + 1, dtype=np.uint32)
            for u in got:
                np.add(self._masked_sum, self._masked.pop(u), out=self._masked_sum)
            self.state = ServerState(Stage.UNMASK, keys=self.state.keys, share_senders=self.state.share_senders,
                                     masked_senders=tuple(got), next_keys=dict(self.next_keys))
        return [Publish(self.state)]

    def _shares_of(self, owner: str, kind: str) -> list[shamir.Share]:
        participants = sorted(self.state.keys)
        out = []
        for holder in sorted(self._graph[owner] & set(self._unmask)):
            answer = self._unmask[holder]
            y = (answer.b_shares if kind == "b" else answer.s_shares).get(owner)
            if y is not None:
                out.append(shamir.Share.from_bytes(share_index(participants, holder), y))
        return out

    def _unmask_complete(self) -> bool:
        """Every secret the sum needs has T shares already (no need to wait for the rest)."""
        if self.state.stage is not Stage.UNMASK:
            return False
        t, alive = self.config.threshold, set(self.state.masked_senders)
        dropped = set(self.state.share_senders) - alive
        return (all(self._share_count.get((u, "b"), 0) >= t for u in alive)
                and all(self._share_count.get((u, "s"), 0) >= t for u in dropped))

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
        assert self._masked_sum is not None  # set when the masked stage closed
        total = self._masked_sum.copy()
        for u in alive:
            add_mask(total, self._reconstruct(u, "b", t), -1)
        for u in dropped:
            s_u = KeyPair.from_private_bytes(self._reconstruct(u, "s", t))
            if s_u.public_bytes() != self.state.keys[u].s_pk:
                raise ValueError(f"shares of {u}'s mask key do not match the key it advertised")
            for v in sorted(self._graph[u] & set(alive)):
                add_mask(total, pair_seed(cfg.context, s_u, u, self.state.keys[v].s_pk, v), -pair_sign(v, u))
        return total

    def _reconstruct(self, owner: str, kind: str, t: int) -> bytes:
        shares = self._shares_of(owner, kind)
        if len(shares) < t:
            what = "self-mask seed" if kind == "b" else "mask key"
            raise ValueError(f"{len(shares)} shares of {owner}'s {what}, threshold {t}")
        return shamir.reconstruct(shares, t)
