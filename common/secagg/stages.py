"""The messages of a round, as plain data (the transport wraps and signs them).

Sites send: AdvertiseKeys, ShareKeys, MaskedInput, UnmaskShares. The server keeps one
ServerState, published retained, so a site that reconnects mid-round finds what it needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Stage(StrEnum):
    KEYS = "keys"  # collecting AdvertiseKeys
    SHARES = "shares"  # public keys published; collecting ShareKeys
    MASKED = "masked"  # boxes routed; collecting MaskedInput
    UNMASK = "unmask"  # survivors published; collecting UnmaskShares
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class AdvertiseKeys:
    c_pk: bytes  # encrypts the shares routed to this site
    s_pk: bytes  # derives this site's pairwise masks


@dataclass(frozen=True)
class ShareKeys:
    boxes: dict[str, bytes]  # neighbour -> AES-GCM box of (b_u share, s_sk share)
    made_for: bytes = b""  # participants_digest of the sites they were made for (the server checks it)


def participants_digest(participants) -> bytes:
    """16 bytes naming a set of sites: shares made for one set are refused for another (shares
    made ahead, in the last round, for the sites that carried keys, may meet a round of others)."""
    return hashlib.sha256("\0".join(sorted(participants)).encode()).digest()[:16]


@dataclass(frozen=True)
class MaskedInput:
    vector: np.ndarray  # uint32, dim + 1 (the count last)
    next_keys: AdvertiseKeys | None = None  # the site's public keys for the NEXT round (carried: see server)


@dataclass(frozen=True)
class UnmaskShares:
    b_shares: dict[str, bytes]  # survivor -> its share of b_survivor
    s_shares: dict[str, bytes]  # dropped site -> its share of s_sk_dropped


SiteMessage = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskShares


@dataclass(frozen=True)
class ServerState:
    """The server's stage and what sites need from it; retained on the broker."""

    stage: Stage
    keys: dict[str, AdvertiseKeys] = field(default_factory=dict)  # U1
    routed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # recipient -> sender -> box
    share_senders: tuple[str, ...] = ()  # U2
    masked_senders: tuple[str, ...] = ()  # U3
    reason: str = ""
    next_keys: dict[str, AdvertiseKeys] = field(default_factory=dict)  # unmask: keys carried for the next round
