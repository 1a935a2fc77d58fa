"""Which jobs this aggregator runs: claims, leases, take-overs, as a pure state machine.

MQTT has no compare-and-set, so no single message can decide who runs a job. Instead every
aggregator writes its own retained, signed claim per job (`jobs/{job}/claims/{me}`: nobody
can overwrite it) and all apply the same rule to the claims they see (docs/design.md,
"Aggregators as a fleet", has the argument):

1. an aggregator bids for one job at a time (epoch e: 1 for a new job, the lapsed holder's
   epoch + 1 for a take-over), only if no live hold or older bid of that epoch exists, or
   joins the bids of epoch e made less than half a settle window ago;
2. after the settle window it decides with what it has seen: it holds the job if no hold of
   epoch >= e exists and its bid is the least (load, hash(job, name)) of the live bids of epoch e;
3. the holder renews its lease every third of it; a finished job is never bid for again;
4. a hold of a higher epoch, or (after a partition) an equal hold that ranks first, makes
   the other holder stop;
5. an aggregator that knows of no other online aggregator (their retained statuses) decides
   its bid at once: a peer that starts meanwhile bids only after READY_S, by when our hold
   has reached it, and a peer that knows of us waits its settle window, which our hold
   beats; so the settle window is paid only where there is a fleet.

Events in (`on_job`, `on_claim`, `on_peer`, `on_tick(now)`, `on_connected(now)`, `on_finished`),
actions out; every time is an argument, so tests drive it with a fake clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from common.claims import live, newer
from common.messages import JobClaim

READY_S = 1.0  # after connecting, no new bid this long: the retained claims arrive first


@dataclass(frozen=True)
class Publish:
    """Publish this claim of ours (retained on our claim topic for its job)."""

    claim: JobClaim


@dataclass(frozen=True)
class Start:
    """Run the job: a take-over (epoch > 1) resumes from the last durable state."""

    job: str
    epoch: int
    previous: str | None


@dataclass(frozen=True)
class Stop:
    """Stop running the job without a word: another aggregator holds it now."""

    job: str
    reason: str


ClaimAction = Publish | Start | Stop


@dataclass(frozen=True)
class Timing:
    lease_s: float
    settle_s: float
    skew_s: float


@dataclass
class _Bid:
    job: str
    epoch: int
    decide_at: float
    previous: str | None
    load: int  # as published in the bid: the decision ranks it so


@dataclass
class ClaimBook:
    me: str
    timing: Timing
    ready_at: float = 0.0  # no bid before the retained claims have arrived
    claims: dict[str, dict[str, JobClaim]] = field(default_factory=dict)  # job -> aggregator -> newest
    candidates: set[str] = field(default_factory=set)  # jobs this aggregator may run
    held: dict[str, JobClaim] = field(default_factory=dict)
    ended: dict[str, JobClaim] = field(default_factory=dict)  # our finished claims: re-published on reconnect
    bid: _Bid | None = None
    peers: dict[str, bool] = field(default_factory=dict)  # other aggregators: online, per their last status

    # --- events -------------------------------------------------------------------------------

    def on_job(self, job: str, now: float | None = None) -> list[ClaimAction]:
        """A job this aggregator could run (its spec is known, it is not pinned elsewhere). With
        `now`, what a tick would do is done at once: alone, the job is held on its arrival, not
        at the next tick (up to tick_s later, on every job's clock)."""
        self.candidates.add(job)
        return [] if now is None else self.on_tick(now)

    def on_peer(self, aggregator: str, online: bool) -> None:
        """Another aggregator's retained status (its Last Will says offline)."""
        if aggregator != self.me:
            self.peers[aggregator] = online

    @property
    def alone(self) -> bool:
        """No other aggregator is online as far as we know: a bid needs no settle window (rule 5)."""
        return not any(self.peers.values())

    def on_job_gone(self, job: str) -> None:
        self.candidates.discard(job)

    def on_claim(self, sender: str, claim: JobClaim, now: float) -> list[ClaimAction]:
        """Another aggregator's claim (ours echoed back are ignored: we know our own)."""
        if sender == self.me or not newer(self.claims.get(claim.job, {}).get(sender), claim):
            return []
        self.claims.setdefault(claim.job, {})[sender] = claim
        mine = self.held.get(claim.job)
        if mine is not None and claim.state == "held" and _outranks(sender, claim, self.me, mine):
            del self.held[claim.job]  # still a candidate: if that holder's lease lapses, we may bid again
            return [Publish(self._claim(claim.job, mine.epoch, "yielded", now, mine.since)),
                    Stop(claim.job, f"{sender} holds it in epoch {claim.epoch}")]
        return []

    def adopt(self, job: str, epoch: int, now: float, previous: str | None = None) -> list[ClaimAction]:
        """Hold a job without bidding: pinned to us, or ours before a restart (`epoch` kept)."""
        self.candidates.discard(job)
        claim = self._claim(job, epoch, "held", now, now, previous)
        self.held[job] = claim
        return [Publish(claim)]

    def on_finished(self, job: str, now: float) -> list[ClaimAction]:
        """The job ended here (done or failed): it is never run again, by anyone."""
        mine = self.held.pop(job, None)
        self.candidates.discard(job)
        epoch = mine.epoch if mine else max((c.epoch for c in self.claims.get(job, {}).values()), default=1)
        self.ended[job] = self._claim(job, epoch, "finished", now, mine.since if mine else now)
        return [Publish(self.ended[job])]

    def on_connected(self, now: float) -> list[ClaimAction]:
        """After a (re)connect: what the broker lost is published again, and a bid in progress
        waits a whole settle window again (claims made meanwhile may not have reached us)."""
        self.ready_at = now + min(self.timing.settle_s, READY_S)
        actions: list[ClaimAction] = [Publish(self._renewed(c, now)) for c in list(self.held.values())]
        actions += [Publish(c) for c in self.ended.values()]  # a hard-killed broker may have lost them
        if self.bid is not None:
            self.bid.decide_at = now + self.timing.settle_s
            b = self.bid
            actions.append(Publish(self._claim(b.job, b.epoch, "bid", now, now, b.previous, load=b.load)))
        return actions

    def on_tick(self, now: float) -> list[ClaimAction]:
        """Renew leases, decide a bid whose window has passed, start the next bid."""
        actions: list[ClaimAction] = [Publish(self._renewed(c, now)) for c in list(self.held.values())
                                      if c.lease_until - now < self.timing.lease_s * 2 / 3]
        if now < self.ready_at:
            return actions
        actions += self._decide_due(now)
        if self.bid is None:
            actions += self._next_bid(now)
            actions += self._decide_due(now)  # alone (rule 5): a new bid is due at once
        return actions

    # --- decisions ----------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.held)

    def finished(self, job: str) -> bool:
        return any(c.state == "finished" for c in self.claims.get(job, {}).values())

    def _decide_due(self, now: float) -> list[ClaimAction]:
        """Decide the bid in progress if its settle window has passed."""
        if self.bid is None or now < self.bid.decide_at:
            return []
        bid, self.bid = self.bid, None
        return self._decide(bid, now)

    def _decide(self, bid: _Bid, now: float) -> list[ClaimAction]:
        """The settle window passed: hold the job if our bid is the winner, else yield."""
        others = self.claims.get(bid.job, {})
        skew = self.timing.skew_s
        beaten = self.finished(bid.job) or bid.job not in self.candidates or any(
            live(c, now, skew) and (c.epoch > bid.epoch or (c.epoch == bid.epoch and c.state == "held")
                                    or (c.epoch < bid.epoch and c.state == "held"))
            for c in others.values())
        bids = [(a, c) for a, c in others.items() if c.epoch == bid.epoch and c.state == "bid" and live(c, now, skew)]
        mine = self._claim(bid.job, bid.epoch, "bid", now, now, bid.previous, load=bid.load)
        if beaten or any(_rank(a, c) < _rank(self.me, mine) for a, c in bids):
            return [Publish(self._claim(bid.job, bid.epoch, "yielded", now, now, bid.previous))]
        held = self._claim(bid.job, bid.epoch, "held", now, now, bid.previous)
        self.held[bid.job] = held
        self.candidates.discard(bid.job)
        return [Publish(held), Start(bid.job, bid.epoch, bid.previous)]

    def _next_bid(self, now: float) -> list[ClaimAction]:
        """Bid for the first job (by id) that nobody live holds or bids for (or join a fresh bid)."""
        for job in sorted(self.candidates - set(self.held)):
            if self.finished(job):
                self.candidates.discard(job)  # for good: a finished job is never run again
                continue
            found = self._biddable(job, now)
            if found is None:
                continue
            epoch, previous = found
            at_once = self.alone and not any(live(c, now, self.timing.skew_s) for c in self.claims.get(job, {}).values())
            self.bid = _Bid(job, epoch, now if at_once else now + self.timing.settle_s, previous, self.load)
            return [Publish(self._claim(job, epoch, "bid", now, now, previous))]
        return []

    def _biddable(self, job: str, now: float) -> tuple[int, str | None] | None:
        """(epoch, previous holder) to bid with, or None if the job is not ours to bid for now."""
        claims = self.claims.get(job, {})
        skew = self.timing.skew_s
        if any(c.state == "held" and live(c, now, skew) for c in claims.values()):
            return None
        fresh = [c for c in claims.values() if c.state == "bid" and live(c, now, skew)]
        if fresh:  # a bid in progress: join it while it is young, else let it decide
            young = [c for c in fresh if now - c.since < self.timing.settle_s / 2]
            return (max(c.epoch for c in young), young[0].previous) if young else None
        top = max(((c.epoch, a) for a, c in claims.items()), default=(0, None))
        previous = top[1] if top[0] and claims[top[1]].state == "held" else None  # type: ignore[index]
        if previous is None and top[0]:  # the last holder of record, if any, in a lower epoch
            holds = [(c.epoch, a) for a, c in claims.items() if c.state == "held"]
            previous = max(holds)[1] if holds else None
        return top[0] + 1, previous

    def _claim(self, job: str, epoch: int, state: str, now: float, since: float,
               previous: str | None = None, load: int | None = None) -> JobClaim:
        lease = now + self.timing.lease_s if state == "held" else now + self.timing.settle_s + self.timing.lease_s
        return JobClaim(job=job, epoch=epoch, state=state, load=self.load if load is None else load, since=since,  # type: ignore[arg-type]
                        lease_until=lease if state in ("bid", "held") else 0.0, issued=now, previous=previous)

    def _renewed(self, claim: JobClaim, now: float) -> JobClaim:
        renewed = claim.model_copy(update={"lease_until": now + self.timing.lease_s, "issued": now})
        self.held[claim.job] = renewed
        return renewed


def _rank(aggregator: str, claim: JobClaim) -> tuple[int, int, str, str]:
    """The deterministic order of claims of one epoch: holds first, then the least loaded,
    then a hash of (job, name), so that equally loaded aggregators share the jobs instead of
    the first name winning every tie (then the name itself, should two hashes ever meet)."""
    tie = hashlib.sha256(f"{claim.job}\0{aggregator}".encode()).hexdigest()
    return (0 if claim.state == "held" else 1, claim.load, tie, aggregator)


def _outranks(sender: str, theirs: JobClaim, me: str, mine: JobClaim) -> bool:
    """Whether their hold beats ours: a later epoch, or the same epoch ranking first (two
    holds of one epoch happen only if the settle window's bound on delivery was broken)."""
    if theirs.epoch != mine.epoch:
        return theirs.epoch > mine.epoch
    return (theirs.since, sender) < (mine.since, me)
