"""A whole round in memory: sites and server wired directly, dropouts at chosen points.

For tests and the benchmark: it is the protocol with the broker replaced by function calls,
so a result here is the state machines' result, not the transport's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from common.secagg.config import SecAggConfig
from common.secagg.keys import KeyPair
from common.secagg.server import (
    Action,
    Deadlines,
    Failed,
    Finished,
    Publish,
    SecAggResult,
    ServerSecAgg,
)
from common.secagg.site import SiteSecAgg
from common.secagg.stages import AdvertiseKeys, ServerState, ShareKeys, SiteMessage, Stage

# where a site stops answering: before it sends the message of that stage
_ORDER = (Stage.KEYS, Stage.SHARES, Stage.MASKED, Stage.UNMASK, Stage.DONE, Stage.FAILED)
DROP_POINTS = {"before_keys": 0, "before_shares": 1, "before_masked": 2, "after_masked": 3}


@dataclass
class RoundLog:
    """What happened: the outcome, the server's full view and per-site costs."""

    result: SecAggResult | None = None
    failure: str = ""
    view: list[tuple[str, SiteMessage]] = field(default_factory=list)  # every message the server got
    site_cpu_s: dict[str, float] = field(default_factory=dict)
    site_bytes_out: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    states: list[ServerState] = field(default_factory=list)  # every state the server published
    sites: dict[str, SiteSecAgg] = field(default_factory=dict)
    next_keys: dict[str, AdvertiseKeys] = field(default_factory=dict)  # carried for the next round


def message_bytes(message: SiteMessage) -> int:
    """Payload bytes of a site message (keys, boxes, vector, shares; no framing)."""
    d = vars(message)
    if "vector" in d:
        nxt = d.get("next_keys")
        return int(np.asarray(d["vector"]).nbytes) + (len(nxt.c_pk) + len(nxt.s_pk) if nxt is not None else 0)
    if "c_pk" in d:
        return len(d["c_pk"]) + len(d["s_pk"])
    maps = [part for part in d.values() if isinstance(part, dict)]
    return sum(len(k) + len(v) for part in maps for k, v in part.items()) + len(d.get("made_for", b""))


def run_round(config: SecAggConfig, inputs: dict[str, tuple[np.ndarray, int]],
              drop: dict[str, str] | None = None, *, carry: bool = False,
              pairs: dict[str, tuple[KeyPair, KeyPair] | None] | None = None,
              carried: dict[str, AdvertiseKeys] | None = None, ahead: dict[str, SiteSecAgg] | None = None,
              early: dict[str, ShareKeys] | None = None) -> RoundLog:
    """Drive one round to its end; `drop` maps a site to one of DROP_POINTS. `carry`: sites
    carry the next round's keys in their masked input (`log.next_keys`, `log.sites[s].next_pairs`);
    `pairs` and `carried`: this round's, carried from the last one (sites and server); `ahead`
    and `early`: sites that already shared for this round, and their shares (to the server)."""
    drop, pairs, ahead = drop or {}, pairs or {}, ahead or {}
    sites = {s: SiteSecAgg(config, s, v, c, pairs=pairs.get(s), carry=carry) for s, (v, c) in inputs.items()
             if s not in ahead}
    for s, site in ahead.items():
        site.set_input(*inputs[s])
    sites = {s: ahead.get(s) or sites[s] for s in inputs}
    log = RoundLog(sites=sites)
    server = ServerSecAgg(config, sorted(inputs), Deadlines(1, 2, 3, 4), carried, early)
    actions = server.start()
    clock = 0.0
    while not server.finished:
        state = _published(actions, log)
        if state is None and server.state.stage is Stage.SHARES and not log.states:  # silent shares stage
            actions = _timed(log, server.tick, clock := server.deadlines.keys)  # (no early shares to come here)
            continue
        if state is None:
            break
        actions = []
        for name, site in sites.items():
            if name in drop and DROP_POINTS[drop[name]] <= _ORDER.index(state.stage):
                continue
            t0 = time.process_time()
            answer = site.on_state(state)
            log.site_cpu_s[name] = log.site_cpu_s.get(name, 0.0) + time.process_time() - t0
            if answer is not None:
                log.view.append((name, answer))
                log.site_bytes_out[name] = log.site_bytes_out.get(name, 0) + message_bytes(answer)
                actions += _timed(log, server.receive, name, answer, clock)
        if not any(isinstance(a, Publish) for a in actions):
            clock = server.deadlines.of(state.stage)
            actions += _timed(log, server.tick, clock)
    _published(actions, log)
    log.next_keys = dict(server.next_keys)
    return log


def _timed(log: RoundLog, fn, *args) -> list[Action]:
    t0 = time.process_time()
    out = fn(*args)
    log.server_cpu_s += time.process_time() - t0
    return out


def _published(actions: list[Action], log: RoundLog) -> ServerState | None:
    state = None
    for a in actions:
        if isinstance(a, Publish):
            state = a.state
            log.states.append(state)
        elif isinstance(a, Finished):
            log.result = a.result
        elif isinstance(a, Failed):
            log.failure = a.reason
    return state
