"""The site's side of a round, as a pure state machine: server state in, message out.

With `carry`, its masked input also carries the public keys of fresh key pairs for the NEXT
round (signed with the message), so that round opens at its shares stage: one broker round
trip fewer a round. Those pairs are used for that one round only (the key agreement binds the
job and the round), like the pairs of a key stage.

A site answers each stage once and repeats the same answer when the retained state is
published again (a reconnect), so re-sending is safe. It refuses what would leak its input:
an unmask request with fewer than T survivors, or a second request naming other survivors
(answering both could hand the server b_v and s_sk_v shares of the same neighbour v).
"""

from __future__ import annotations

import os

import numpy as np

from common.secagg import graph, shamir
from common.secagg.config import SecAggConfig, SecAggError
from common.secagg.keys import KeyPair, agree, open_box, seal
from common.secagg.masks import add_mask, pair_seed, pair_sign
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

BOX_PURPOSE = "box"


def share_index(participants: list[str] | tuple[str, ...], who: str) -> int:
    """A site's public Shamir x: its place (from 1) among the round's sorted participants."""
    return sorted(participants).index(who) + 1


def advertised(pairs: tuple[KeyPair, KeyPair]) -> AdvertiseKeys:
    """The public keys of a site's (c, s) key pairs, as it advertises them."""
    c, s = pairs
    return AdvertiseKeys(c.public_bytes(), s.public_bytes())


class SiteSecAgg:
    """One site's round: fresh keys and self-mask seed, its encoded input, the shares it holds."""

    def __init__(self, config: SecAggConfig, me: str, values: np.ndarray | None = None, count: int = 0, *,
                 pairs: tuple[KeyPair, KeyPair] | None = None, carry: bool = False) -> None:
        """`pairs`: the (c, s) key pairs this site generated for this round during the last one
        and carried in its masked input (fresh ones if None); `carry`: make the next round's
        pairs and carry their public keys in this round's masked input."""
        self.config, self.me, self.carry = config, me, carry
        self._input: np.ndarray | None = None
        if values is not None:
            self.set_input(values, count)
        self._c, self._s = pairs or (KeyPair.generate(), KeyPair.generate())
        self.next_pairs: tuple[KeyPair, KeyPair] | None = None  # the next round's, once carried
        self._b = os.urandom(shamir.SECRET_BYTES)
        self._answers: dict[Stage, SiteMessage] = {}
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (b, s_sk) shares
        self._neighbours: frozenset[str] = frozenset()
        self._keys: dict[str, AdvertiseKeys] = {}
        self._box_keys: dict[str, bytes] = {}  # one X25519 per neighbour, used to seal and to open
        self._unmasked_for: tuple[str, ...] | None = None
        self._shared_for: tuple[str, ...] = ()  # the participants its shares are for

    def set_input(self, values: np.ndarray, count: int) -> None:
        """The input, given late: keys and shares need none, so a site can run those stages
        while it trains; it answers the masked stage once the input is here."""
        if np.asarray(values).size != self.config.dim:
            raise SecAggError(f"input has {np.asarray(values).size} values, the round expects {self.config.dim}")
        if self._input is not None:
            raise SecAggError("the input of a round is given once")
        self._input = self.config.encoding.encode(values, count)

    @property
    def has_input(self) -> bool:
        return self._input is not None

    def advertise(self) -> AdvertiseKeys:
        return advertised((self._c, self._s))

    def on_state(self, state: ServerState) -> SiteMessage | None:
        """This site's answer to the server's published stage, or None (nothing to say)."""
        if state.stage is Stage.KEYS:
            return self.advertise()
        if state.stage in (Stage.DONE, Stage.FAILED):
            return None
        if state.stage in self._answers and state.stage is not Stage.UNMASK:
            if state.stage is Stage.SHARES and tuple(sorted(state.keys)) != self._shared_for:
                return None  # shared (ahead) for other participants: a drop-out of this shares stage
            return self._answers[state.stage]
        if state.keys.get(self.me) != self.advertise():
            return None  # not a participant with these keys (joined late, or restarted)
        handler = {Stage.SHARES: self._share, Stage.MASKED: self._mask, Stage.UNMASK: self._unmask}
        answer = handler[state.stage](state)
        if answer is not None:
            self._answers[state.stage] = answer
        return answer

    def _box_key(self, other: str) -> bytes:
        if other not in self._box_keys:
            self._box_keys[other] = agree(self.config.context, BOX_PURPOSE, self._c, self.me, self._keys[other].c_pk, other)
        return self._box_keys[other]

    def _share(self, state: ServerState) -> ShareKeys:
        """Stage 1: Shamir-share b_u and s_sk among the neighbours; one box per neighbour."""
        cfg = self.config
        self._keys = dict(state.keys)
        participants = sorted(state.keys)
        self._shared_for = tuple(participants)
        self._neighbours = graph.neighbours_of(participants, cfg.neighbours, cfg.round_seed, self.me)
        if len(self._neighbours) < cfg.threshold:
            raise SecAggError(f"{len(self._neighbours)} neighbours, fewer than the threshold {cfg.threshold}")
        xs = {v: share_index(participants, v) for v in self._neighbours}
        b_sh = shamir.split(self._b, cfg.threshold, list(xs.values()))
        s_sh = shamir.split(self._s.private_bytes(), cfg.threshold, list(xs.values()))
        boxes = {v: seal(self._box_key(v), cfg.context, self.me, v, b_sh[x].y_bytes() + s_sh[x].y_bytes())
                 for v, x in xs.items()}
        return ShareKeys(boxes, participants_digest(participants))

    def _mask(self, state: ServerState) -> MaskedInput | None:
        """Stage 2: open the boxes from neighbours, then send the masked input."""
        if self._input is None or Stage.SHARES not in self._answers or self.me not in state.share_senders:
            return None
        mine = share_index(sorted(self._keys), self.me)
        for sender, box in state.routed.get(self.me, {}).items():
            if sender not in self._neighbours or sender not in state.share_senders:
                continue
            plain = open_box(self._box_key(sender), self.config.context, sender, self.me, box)
            half = shamir.SHARE_BYTES
            self._held[sender] = (shamir.Share.from_bytes(mine, plain[:half]),
                                  shamir.Share.from_bytes(mine, plain[half:]))
        y = self._input.copy()
        add_mask(y, self._b, +1)
        for v in sorted(self._neighbours & set(state.share_senders)):
            add_mask(y, pair_seed(self.config.context, self._s, self.me, self._keys[v].s_pk, v), pair_sign(self.me, v))
        if not self.carry:
            return MaskedInput(y)
        self.next_pairs = (KeyPair.generate(), KeyPair.generate())
        return MaskedInput(y, advertised(self.next_pairs))

    def _unmask(self, state: ServerState) -> UnmaskShares | None:
        """Stage 3: b shares of surviving neighbours, s_sk shares of dropped ones; never both."""
        survivors = tuple(sorted(state.masked_senders))
        if self._unmasked_for is not None:
            if survivors != self._unmasked_for:
                raise SecAggError("a second unmask request with other survivors: refused")
            return self._answers[Stage.UNMASK]  # type: ignore[return-value]
        if Stage.MASKED not in self._answers or self.me not in survivors:
            return None  # declared dropped: say nothing
        if len(survivors) < self.config.threshold or not set(survivors) <= set(state.share_senders):
            raise SecAggError(f"unmask request with {len(survivors)} survivors (threshold "
                              f"{self.config.threshold}) or survivors that never shared keys: refused")
        self._unmasked_for = survivors
        alive = set(survivors)
        return UnmaskShares(
            b_shares={v: b.y_bytes() for v, (b, _) in self._held.items() if v in alive},
            s_shares={v: s.y_bytes() for v, (_, s) in self._held.items() if v not in alive},
        )
