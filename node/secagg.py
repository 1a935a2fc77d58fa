"""The node's side of secure aggregation (issue 20): after training, instead of publishing its
update, a site runs `SiteSecAgg` against the aggregator's retained stage state.

Kept out of node/service.py: the service opens a round when it reads the round's model, feeds
the states it reads on `jobs/{job}/secagg`, hands the trained parameters over, and re-sends
after a reconnect; everything else is here and in common/secagg.

Why the round opens before training: keys and shares need no input, so a site runs those
stages while it trains and only the masked stage waits for the trained update. The masked
input of round r carries the site's public keys for round r + 1 (pairs kept here, in memory
only); once the unmask state lists the keys carried, the site sends its round r + 1 shares
for those sites (`share_ahead`), so round r + 1 opens at its masked stage when its sites are
exactly those.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from pydantic import ValidationError

from common import topics
from common.compression import CompressionSpec
from common.messages import Body, JobSpec, SecAggState
from common.secagg.config import SecAggConfig, SecAggError
from common.secagg.keys import KeyPair
from common.secagg.params import Params, flat_delta, round_config
from common.secagg.site import SiteSecAgg, advertised
from common.secagg.stages import ServerState, Stage
from common.secagg.wire import server_state, site_body, stage_keys
from common.training.args import TrainingArgs

Send = Callable[[str, str, Body], None]  # (topic, message type, body)
log = structlog.get_logger("node.secagg")
EARLY_STATES = 8  # states of unknown jobs kept (the latest per job)
PER_NODE_ALGORITHMS = ("scaffold", "admm")  # their aggregator needs each node's state, not a sum


def secure_refusal(spec: JobSpec) -> str | None:
    """Why this node cannot honour the job's secure aggregation (None if it can): whatever
    would make it send something other than its full update delta, masked."""
    if spec.secure_aggregation is None:
        return None
    try:
        compressed = CompressionSpec.of(spec.training_args).kind != "none"
    except ValidationError:
        return None  # an invalid compression is declined by the service's own check
    if compressed:
        return ("secure aggregation sums full update deltas; update compression (training_args.compression) "
                "cannot be combined with it")
    algorithm = TrainingArgs.of(spec.training_args).algorithm
    if algorithm in PER_NODE_ALGORITHMS:
        return f"secure aggregation hides each node's update; the {algorithm!r} local algorithm needs it seen"
    return None


def as_params(values: dict[str, Any]) -> Params:
    """The training child's tensors as they came (torch, or held as numpy: the node needs no torch)."""
    return dict(values)


@dataclass(frozen=True)
class Ahead:
    """A site's next round, made during this round's unmask stage: its shares already sent."""

    participants: tuple[str, ...]
    site: SiteSecAgg


class SiteRound:
    """One site's round: the round's model (the reference), later its trained update and count."""

    def __init__(self, spec: JobSpec, round_: int, me: str, reference: Params, params: Params | None = None,
                 n_samples: int = 0, send: Send | None = None, pairs: tuple[KeyPair, KeyPair] | None = None,
                 ahead: Ahead | None = None) -> None:
        """`pairs`: this round's key pairs, made and carried in the last round (see SiteSecAgg);
        `ahead`: this round's site as it shared ahead during the last round's unmask stage."""
        if spec.secure_aggregation is None:
            raise ValueError(f"job {spec.job_id} does not use secure aggregation")
        self.spec, self.round, self.me, self._pairs, self._ahead = spec, round_, me, pairs, ahead
        self.ahead: Ahead | None = None  # the next round's, once this site shared ahead for it
        self.asked_ahead: SecAggState | None = None  # the unmask state that asks it to (see SecureRounds)
        self._send: Send = send or (lambda *_: None)
        self._reference = reference
        self._delta: np.ndarray | None = None
        self._count = 0
        self._site: SiteSecAgg | None = None
        self.last_state: SecAggState | None = None
        self.last_sent: tuple[str, str, Body] | None = None  # re-sent after a reconnect
        self.sent_masked = False
        if params is not None:
            self.set_input(params, n_samples)

    def set_input(self, params: Params, n_samples: int) -> None:
        """The trained parameters; the masked stage, if already open, is answered now."""
        self._delta, self._count = flat_delta(params, self._reference), n_samples
        if self._site is not None:
            self._site.set_input(self._delta, n_samples)
        if self.last_state is not None and self.last_state.stage == "masked":
            self.on_state(self.last_state)

    def on_state(self, body: SecAggState) -> None:
        """React to the aggregator's published stage; re-publishing makes it answer again."""
        if body.round != self.round or self.me not in body.expected:
            return
        self.last_state = body
        if self._site is None:
            self._site = self._site_for(body)
        answer = self._site.on_state(server_state(body, for_site=self.me))
        if answer is None:
            return
        type_, out = site_body(self.round, answer)
        self.last_sent = (topics.secagg_site(self.spec.owner, self.spec.job_id, self.me), type_, out)
        self.sent_masked = self.sent_masked or type_ == "secagg_masked"
        self._send(*self.last_sent)
        log.debug("secagg_sent", job=self.spec.job_id, round=self.round, stage=body.stage, type=type_)

    def _config(self, round_: int, sites: int) -> SecAggConfig:
        opt = self.spec.secure_aggregation
        assert opt is not None
        return round_config(self.spec.job_id, round_, opt.threshold, opt.neighbours, opt.clip, opt.max_count,
                            self._reference, sites)

    def _site_for(self, body: SecAggState) -> SiteSecAgg:
        """The site that shared ahead, if it shared for exactly the round's sites (the server
        uses the early shares then, and only then); else a new one, with the carried pairs."""
        if self._ahead is not None and self._ahead.participants == tuple(sorted(body.expected)):
            site = self._ahead.site
            if self._delta is not None:
                site.set_input(self._delta, self._count)
            return site
        return SiteSecAgg(self._config(self.round, len(body.expected)), self.me, self._delta, self._count,
                          pairs=self._pairs, carry=self.round < self.spec.rounds)  # the last round carries nothing

    def share_ahead(self, body: SecAggState) -> None:
        """During this round's unmask stage: the next round's shares, for the sites whose keys
        the state lists as carried (the server uses them if the next round's sites are exactly
        those), so the next round opens at its masked stage. Once, and only with our own keys."""
        pairs = self.next_pairs
        if pairs is None or self.ahead is not None or body.round != self.round:
            return
        keys = stage_keys(body.next_keys)
        if keys.get(self.me) != advertised(pairs):  # absent, or not the keys we carried
            return
        site = SiteSecAgg(self._config(self.round + 1, len(keys)), self.me, pairs=pairs,
                          carry=self.round + 1 < self.spec.rounds)
        answer = site.on_state(ServerState(Stage.SHARES, keys=keys))
        self.ahead = Ahead(tuple(sorted(keys)), site)
        if answer is not None:
            self._send(topics.secagg_site(self.spec.owner, self.spec.job_id, self.me), *site_body(self.round + 1, answer))

    def advertise(self) -> None:
        """Send this round's keys before any state asks: a site that carried none into this
        round (it was not in the last one, dropped before its masked input, or restarted and lost
        them) is awaited by a key stage, or, if the server holds keys it carried and lost, is
        let go by the shares stage instead of holding it up to its deadline."""
        assert self._pairs is not None
        type_, out = site_body(self.round, advertised(self._pairs))
        self.last_sent = (topics.secagg_site(self.spec.owner, self.spec.job_id, self.me), type_, out)
        self._send(*self.last_sent)

    @property
    def next_pairs(self) -> tuple[KeyPair, KeyPair] | None:
        """The key pairs for round + 1 whose public keys this round's masked input carried."""
        return None if self._site is None else self._site.next_pairs


class SecureRounds:
    """The node's open secure rounds, one per job, shared by the delivery and training threads."""

    def __init__(self, me: str, send: Send, defer: Callable[[Callable[[], None]], None] | None = None) -> None:
        """`defer`: how to run the next round's early shares (default: at once, after the unmask
        answer is sent); a simulated fleet queues them behind its socket reads."""
        self.me, self._send = me, send
        self._defer = defer or (lambda work: work())
        self._lock = threading.RLock()
        self._rounds: dict[str, SiteRound] = {}
        self._states: dict[str, SecAggState] = {}  # the latest retained state per job
        self._early: OrderedDict[str, Any] = OrderedDict()  # states of jobs not (yet) accepted

    def open(self, spec: JobSpec, round_: int, reference: Params) -> None:
        """The model of a round this node will train arrived: take part in its key stages now."""
        with self._lock:
            current = self._rounds.get(spec.job_id)
            if current is not None and current.round >= round_:
                return
            last = current if current is not None and current.round == round_ - 1 else None
            if last is not None and last.asked_ahead is not None:  # its deferred early shares: made now,
                self._make_ahead(last, last.asked_ahead)  # before this round's site (the server awaits them)
            pairs = last.next_pairs if last is not None else None
            fresh = pairs is None and round_ > 1  # carried none (or lost them): say so at once
            site = SiteRound(spec, round_, self.me, reference, send=self._guarded,
                             pairs=pairs or (KeyPair.generate(), KeyPair.generate()), ahead=last and last.ahead)
            self._rounds[spec.job_id] = site
            if fresh:
                site.advertise()
            state = self._states.get(spec.job_id)
            if state is not None:
                self._feed(self._rounds[spec.job_id], state)

    def on_state(self, job: str, body: SecAggState) -> None:
        with self._lock:
            self._states[job] = body
            site = self._rounds.get(job)
            if site is not None:
                self._feed(site, body)

    def set_input(self, job: str, round_: int, params: Params, n_samples: int) -> bool:
        """Hand the trained update to its round; False when that round is no longer open here."""
        with self._lock:
            site = self._rounds.get(job)
            if site is None or site.round != round_:
                return False
            try:
                site.set_input(params, n_samples)
            except SecAggError as exc:
                log.warning("secagg_refused", job=job, round=round_, error=str(exc))
            return True

    def resend(self) -> None:
        """After a reconnect: each open round's last answer again (the server takes it once)."""
        with self._lock:
            for site in self._rounds.values():
                if site.last_sent is not None and not _over(site.last_state):
                    self._guarded(*site.last_sent)

    def forget(self, job: str) -> None:
        with self._lock:
            self._rounds.pop(job, None)
            self._states.pop(job, None)
            self._early.pop(job, None)

    def hold_early(self, job: str, msg: Any) -> None:
        """A state whose job this node does not run yet (it may be accepting it): latest kept."""
        with self._lock:
            self._early.pop(job, None)
            self._early[job] = msg
            while len(self._early) > EARLY_STATES:
                self._early.popitem(last=False)

    def take_early(self, job: str) -> Any:
        with self._lock:
            return self._early.pop(job, None)

    def _feed(self, site: SiteRound, body: SecAggState) -> None:
        try:
            site.on_state(body)
        except SecAggError as exc:  # e.g. a second unmask request naming other survivors
            log.warning("secagg_refused", job=site.spec.job_id, round=site.round, stage=body.stage, error=str(exc))
            return
        if body.stage == "unmask" and body.next_keys and body.round == site.round and site.asked_ahead is None:
            site.asked_ahead = body
            self._defer(lambda: self._share_ahead(site, body))

    def _share_ahead(self, site: SiteRound, body: SecAggState) -> None:
        """Only while `site` is still the job's open round: once the next round has opened here
        with a site of its own, shares made now would not be that site's."""
        with self._lock:
            if self._rounds.get(site.spec.job_id) is site:
                self._make_ahead(site, body)

    def _make_ahead(self, site: SiteRound, body: SecAggState) -> None:
        try:
            site.share_ahead(body)
        except SecAggError as exc:
            log.warning("secagg_refused", job=site.spec.job_id, round=site.round + 1, stage="shares", error=str(exc))

    def _guarded(self, topic: str, type_: str, body: Body) -> None:
        try:
            self._send(topic, type_, body)
        except Exception as exc:  # noqa: BLE001 - the broker is away: resent on reconnect
            log.warning("secagg_send_failed", topic=topic, type=type_, error=str(exc))


def _over(state: SecAggState | None) -> bool:
    return state is not None and state.stage in ("done", "failed")
