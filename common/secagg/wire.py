"""The stage messages as signed message bodies (common/messages.py) and back.

The state machines speak plain dataclasses; the services send bodies. Converting here keeps
both sides of the broker on one mapping, and checks the round on the way in.
"""

from __future__ import annotations

import numpy as np

from common.messages import (
    Body,
    SecAggKeys,
    SecAggMasked,
    SecAggPublicKeys,
    SecAggShares,
    SecAggState,
    SecAggUnmask,
)
from common.secagg.config import SecAggError
from common.secagg.stages import (
    AdvertiseKeys,
    MaskedInput,
    ServerState,
    ShareKeys,
    SiteMessage,
    Stage,
    UnmaskShares,
)


def stage_keys(keys: dict[str, SecAggPublicKeys]) -> dict[str, AdvertiseKeys]:
    """Sites' public keys as the state machines hold them."""
    return {s: AdvertiseKeys(k.c_pk, k.s_pk) for s, k in keys.items()}


def wire_keys(keys: dict[str, AdvertiseKeys]) -> dict[str, SecAggPublicKeys]:
    """Sites' public keys as a state body carries them."""
    return {s: SecAggPublicKeys(c_pk=k.c_pk, s_pk=k.s_pk) for s, k in keys.items()}


SITE_TYPES = {SecAggKeys: "secagg_keys", SecAggShares: "secagg_shares", SecAggMasked: "secagg_masked",
              SecAggUnmask: "secagg_unmask"}


def site_body(round_: int, message: SiteMessage) -> tuple[str, Body]:
    """(message type, body) of a site's stage message."""
    if isinstance(message, AdvertiseKeys):
        body: Body = SecAggKeys(round=round_, c_pk=message.c_pk, s_pk=message.s_pk)
    elif isinstance(message, ShareKeys):
        body = SecAggShares(round=round_, boxes=message.boxes, made_for=message.made_for)
    elif isinstance(message, MaskedInput):
        nxt = message.next_keys
        body = SecAggMasked(round=round_, vector=np.ascontiguousarray(message.vector, dtype=np.uint32),
                            next_keys=None if nxt is None else SecAggPublicKeys(c_pk=nxt.c_pk, s_pk=nxt.s_pk))
    else:
        body = SecAggUnmask(round=round_, b_shares=message.b_shares, s_shares=message.s_shares)
    return SITE_TYPES[type(body)], body


def site_message(body: Body) -> SiteMessage:
    """The stage message of a received body."""
    if isinstance(body, SecAggKeys):
        return AdvertiseKeys(body.c_pk, body.s_pk)
    if isinstance(body, SecAggShares):
        return ShareKeys(dict(body.boxes), bytes(body.made_for))
    if isinstance(body, SecAggMasked):
        vector = np.asarray(body.vector)
        if vector.dtype != np.uint32 or vector.ndim != 1:
            raise SecAggError(f"masked input must be a uint32 vector, got {vector.dtype} {vector.shape}")
        nxt = body.next_keys
        return MaskedInput(vector, None if nxt is None else AdvertiseKeys(nxt.c_pk, nxt.s_pk))
    if isinstance(body, SecAggUnmask):
        return UnmaskShares(dict(body.b_shares), dict(body.s_shares))
    raise SecAggError(f"not a secure-aggregation message: {type(body).__name__}")


def state_body(round_: int, state: ServerState, expected: list[str], deadline: float) -> SecAggState:
    return SecAggState(
        round=round_, stage=state.stage.value, expected=sorted(expected), deadline=deadline,
        keys=wire_keys(state.keys),
        routed=state.routed, share_senders=list(state.share_senders),
        masked_senders=list(state.masked_senders), reason=state.reason,
        next_keys=wire_keys(state.next_keys))


_last_keys: tuple[object, dict[str, AdvertiseKeys]] | None = None  # (a body's keys, converted)


def _keys_of(body: SecAggState) -> dict[str, AdvertiseKeys]:
    """The public keys of a state, converted once per decoded state: a simulated fleet hands the
    same decoded state to each of its N sites (converting n keys for each was O(n^2) a stage).
    The dict is shared: the state machines only read it."""
    global _last_keys
    last = _last_keys
    if last is not None and last[0] is body.keys:
        return last[1]
    keys = stage_keys(body.keys)
    _last_keys = (body.keys, keys)
    return keys


def server_state(body: SecAggState, for_site: str | None = None) -> ServerState:
    """The state as the state machines read it; `for_site`: only the boxes routed to that site
    (what it reads of the n k routed boxes), not a copy of all of them per site."""
    routed = body.routed if for_site is None else {for_site: body.routed.get(for_site, {})}
    return ServerState(
        Stage(body.stage), keys=_keys_of(body),
        routed={r: dict(b) for r, b in routed.items()}, share_senders=tuple(body.share_senders),
        masked_senders=tuple(body.masked_senders), reason=body.reason,
        next_keys=stage_keys(body.next_keys))
