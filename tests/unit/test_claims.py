"""The fleet's claim decisions (aggregators/claims.py, common/claims.py) on a fake clock and a
simulated broker with delivery delays: each job held by exactly one aggregator, leases,
take-overs, finished jobs, restarts, reconnects."""

from __future__ import annotations

import heapq
import random

import pytest

from aggregators.claims import ClaimBook, Publish, Start, Stop, Timing
from common.claims import live, newer, valid_takeover
from common.messages import JobClaim

T = Timing(lease_s=3.0, settle_s=1.0, skew_s=0.1)
TICK = 0.1


class Fleet:
    """Aggregators' books joined by a broker that delivers each claim and each online status
    after a random delay below the settle window's bound (retained: a book that starts later
    gets the latest at once)."""

    def __init__(self, names: list[str], *, max_delay: float = 0.3, seed: int = 0, start: float = 0.0) -> None:
        self.now = start
        self.rng = random.Random(seed)
        self.max_delay = max_delay
        self.books: dict[str, ClaimBook] = {}
        self.dead: set[str] = set()
        self.retained: dict[tuple[str, str], JobClaim] = {}
        self.queue: list[tuple[float, int, str, str, JobClaim | None]] = []  # None: an online status
        self.started: list[tuple[str, str, int]] = []  # (job, aggregator, epoch)
        self.stopped: list[tuple[str, str]] = []
        self._n = 0
        for name in names:
            self.add(name)

    def add(self, name: str, jobs: list[str] = ()) -> ClaimBook:
        book = ClaimBook(name, T)
        self.books[name] = book
        for job in jobs:
            book.on_job(job)
        self.apply(name, book.on_connected(self.now))
        for other in self.books:  # retained statuses on subscribe; ours reaches the others later
            book.on_peer(other, True)
            self._n += 1
            heapq.heappush(self.queue, (self.now + self.rng.uniform(0, self.max_delay), self._n, other, name, None))
        for (_, sender), claim in self.retained.items():  # retained claims on subscribe
            self.deliver(name, sender, claim)
        return book

    def submit(self, job: str) -> None:
        for name, book in self.books.items():
            if name not in self.dead:
                book.on_job(job)

    def apply(self, name: str, actions) -> None:
        for action in actions:
            if isinstance(action, Publish):
                self.retained[(action.claim.job, name)] = action.claim
                for receiver in self.books:
                    self._n += 1
                    delay = self.rng.uniform(0, self.max_delay)
                    heapq.heappush(self.queue, (self.now + delay, self._n, receiver, name, action.claim))
            elif isinstance(action, Start):
                self.started.append((action.job, name, action.epoch))
            elif isinstance(action, Stop):
                self.stopped.append((action.job, name))

    def deliver(self, receiver: str, sender: str, claim: JobClaim | None) -> None:
        if receiver in self.dead:
            return
        if claim is None:
            self.books[receiver].on_peer(sender, True)
        else:
            self.apply(receiver, self.books[receiver].on_claim(sender, claim, self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + TICK, 6)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, receiver, sender, claim = heapq.heappop(self.queue)
                self.deliver(receiver, sender, claim)
            for name, book in self.books.items():
                if name not in self.dead:
                    self.apply(name, book.on_tick(self.now))

    def holders(self, job: str) -> set[str]:
        return {n for n, b in self.books.items() if job in b.held and n not in self.dead}

    def finish(self, job: str) -> None:
        (holder,) = self.holders(job)
        self.apply(holder, self.books[holder].on_finished(job, self.now))


JOBS = [f"job-{i:02d}" for i in range(10)]


@pytest.mark.parametrize("seed", range(12))
def test_three_aggregators_started_together_hold_each_of_ten_jobs_exactly_once_spread(seed):
    fleet = Fleet(["agg-a", "agg-b", "agg-c"], seed=seed)
    for job in JOBS:
        fleet.submit(job)
    fleet.run(10 * T.settle_s + 5)
    assert sorted(j for j, _, _ in fleet.started) == JOBS, "a job started twice or never"
    for job in JOBS:
        assert len(fleet.holders(job)) == 1
    loads = sorted(b.load for b in fleet.books.values())
    assert loads == [3, 3, 4], "the least loaded wins each job"
    assert not fleet.stopped


def test_a_lapsed_lease_is_taken_over_by_exactly_one_other_with_the_next_epoch():
    fleet = Fleet(["agg-a", "agg-b", "agg-c"], seed=1)
    fleet.submit("j")
    fleet.run(3)
    (holder,) = fleet.holders("j")
    fleet.dead.add(holder)
    died = fleet.now
    fleet.run(T.lease_s + T.skew_s + T.settle_s + 1)
    takers = [(n, e) for j, n, e in fleet.started if j == "j" and n != holder]
    assert len(takers) == 1 and takers[0][1] == 2
    (taker,) = fleet.holders("j")
    assert fleet.books[taker].held["j"].previous == holder
    first = fleet.retained[("j", taker)]
    assert first.since - died <= T.lease_s + T.skew_s + T.settle_s + TICK  # bid once the lease lapsed
    assert valid_takeover(fleet.retained[("j", holder)], first, fleet.now, T.skew_s) is None


def test_a_renewing_holder_keeps_its_job_for_good():
    fleet = Fleet(["agg-a", "agg-b"], seed=2)
    fleet.submit("j")
    fleet.run(30)
    assert len([s for s in fleet.started if s[0] == "j"]) == 1


def test_a_finished_job_is_never_claimed_again_not_even_by_a_later_aggregator():
    fleet = Fleet(["agg-a", "agg-b"], seed=3)
    fleet.submit("j")
    fleet.run(3)
    fleet.finish("j")
    fleet.run(T.lease_s * 3)
    late = fleet.add("agg-late", jobs=["j"])
    fleet.run(T.lease_s * 3)
    assert [s for s in fleet.started if s[0] == "j"] == [s for s in fleet.started[:1]]
    assert not late.held and late.bid is None


def test_a_restarted_holder_that_was_replaced_stops_at_once():
    book = ClaimBook("agg-a", T)
    book.on_job("j")
    assert [type(a) for a in book.adopt("j", 1, now=100.0)] == [Publish]
    taker = JobClaim(job="j", epoch=2, state="held", since=99.0, lease_until=103.0, issued=99.5, previous="agg-a")
    actions = book.on_claim("agg-b", taker, now=100.1)
    assert [type(a) for a in actions] == [Publish, Stop] and actions[0].claim.state == "yielded"
    assert "j" not in book.held


def test_two_holds_of_one_epoch_after_a_partition_leave_one():
    a, b = ClaimBook("agg-a", T), ClaimBook("agg-b", T)
    (pa,) = a.adopt("j", 1, now=10.0)
    (pb,) = b.adopt("j", 1, now=11.0)
    assert a.on_claim("agg-b", pb.claim, 11.1) == []  # ours is older: we keep it
    assert [type(x) for x in b.on_claim("agg-a", pa.claim, 11.1)] == [Publish, Stop]


def test_a_bid_waits_a_whole_settle_window_again_after_a_reconnect():
    book = ClaimBook("agg-a", T)
    book.on_peer("agg-b", True)  # a fleet: bids settle
    book.on_connected(0.0)
    book.on_job("j")
    assert book.on_tick(0.5) == []  # not ready: retained claims may still be arriving
    (bid,) = book.on_tick(1.0)
    assert bid.claim.state == "bid"
    book.on_tick(1.5)
    book.on_connected(1.8)  # the broker restarted within the window
    assert not any(isinstance(a, Start) for a in book.on_tick(2.1))
    assert any(isinstance(a, Start) for a in book.on_tick(2.9))


def test_an_old_bid_is_not_joined_a_young_one_is():
    old = JobClaim(job="j", epoch=1, state="bid", since=0.0, lease_until=4.0, issued=0.0)
    book = ClaimBook("agg-b", T)
    book.on_job("j")
    book.on_claim("agg-a", old, 0.7)
    assert book.on_tick(0.7) == []  # agg-a's bid is 0.7 s old (> settle/2): it decides alone
    young = old.model_copy(update={"since": 0.6, "issued": 0.6})
    book.on_claim("agg-c", young, 0.7)
    (bid,) = book.on_tick(0.7)
    assert bid.claim.epoch == 1 and bid.claim.state == "bid"


def test_a_stale_copy_never_replaces_a_newer_claim():
    new = JobClaim(job="j", epoch=2, state="held", since=5.0, lease_until=9.0, issued=6.0)
    assert not newer(new, new.model_copy(update={"issued": 5.5}))
    assert not newer(new, new.model_copy(update={"epoch": 1, "issued": 7.0}))
    assert newer(new, new.model_copy(update={"issued": 6.5}))
    assert live(new, 9.05, 0.1) and not live(new, 9.2, 0.1)


BOUND = JobClaim(job="j", epoch=1, state="held", since=0.0, lease_until=10.0, issued=7.0)


@pytest.mark.parametrize("change, now, ok", [
    ({}, 12.0, True),
    ({"state": "bid"}, 12.0, False),
    ({"epoch": 1}, 12.0, False),
    ({"since": 9.0}, 12.0, False),  # bid while the bound aggregator's lease ran
    ({"since": 30.0}, 12.0, False),  # dated in the future
])
def test_a_takeover_is_followed_only_after_the_bound_lease_lapsed(change, now, ok):
    new = JobClaim(job="j", epoch=2, state="held", since=11.0, lease_until=14.0, issued=11.0, previous="agg-a")
    new = new.model_copy(update=change)
    assert (valid_takeover(BOUND, new, now, 0.5) is None) is ok
    assert valid_takeover(None, new, now, 0.5) is not None
    assert valid_takeover(BOUND.model_copy(update={"state": "finished"}), new, now, 0.5) is not None


def test_a_bound_aggregator_that_yielded_is_left_for_the_hold_of_its_epoch():
    yielded = BOUND.model_copy(update={"state": "yielded", "issued": 8.0})
    other = JobClaim(job="j", epoch=1, state="held", since=0.0, lease_until=14.0, issued=9.0)
    assert valid_takeover(yielded, other, 9.5, 0.5) is None
    assert valid_takeover(BOUND, other, 9.5, 0.5) is not None


def test_a_reconnect_publishes_again_what_a_hard_killed_broker_may_have_lost():
    book = ClaimBook("agg-a", T)
    book.adopt("held-job", 1, now=0.0)
    book.adopt("done-job", 1, now=0.0)
    book.on_finished("done-job", now=1.0)
    states = sorted((a.claim.job, a.claim.state) for a in book.on_connected(2.0) if isinstance(a, Publish))
    assert states == [("done-job", "finished"), ("held-job", "held")]


def test_a_lone_aggregator_holds_a_job_at_its_first_tick_without_a_settle_window():
    """Red before: a job waited a whole settle window (2 s by default) even with one aggregator."""
    book = ClaimBook("agg-a", T)
    book.on_connected(0.0)
    book.on_peer("agg-a", True)  # our own status, echoed: not a peer
    book.on_peer("agg-old", False)  # a stopped aggregator's Last Will
    book.on_job("j")
    assert book.on_tick(0.5) == []  # not ready yet: retained statuses and claims may be arriving
    actions = book.on_tick(1.0)
    assert [type(a) for a in actions] == [Publish, Publish, Start]
    assert [a.claim.state for a in actions[:2]] == ["bid", "held"]


def test_a_peer_online_makes_bids_settle_and_its_last_will_ends_that():
    book = ClaimBook("agg-a", T)
    book.on_connected(0.0)
    book.on_peer("agg-b", True)
    book.on_job("j1")
    assert [a.claim.state for a in book.on_tick(1.0)] == ["bid"]
    assert not any(isinstance(a, Start) for a in book.on_tick(1.5))
    assert any(isinstance(a, Start) for a in book.on_tick(2.0))
    book.on_peer("agg-b", False)
    book.on_job("j2")
    assert any(isinstance(a, Start) and a.job == "j2" for a in book.on_tick(2.1))


def test_a_lone_aggregator_that_sees_another_bid_still_settles():
    """A peer's bid can arrive before its status: the bid is joined and settles, never taken at once."""
    book = ClaimBook("agg-b", T)
    book.on_connected(0.0)
    book.on_job("j")
    book.on_claim("agg-a", JobClaim(job="j", epoch=1, state="bid", since=1.0, lease_until=5.0, issued=1.0), 1.1)
    actions = book.on_tick(1.1)
    assert [a.claim.state for a in actions] == ["bid"] and not any(isinstance(a, Start) for a in actions)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("second_after", [0.0, 0.3, 0.9, 1.0, 1.1, 1.5])
def test_a_second_aggregator_starting_while_a_lone_one_claims_never_makes_two_holders(seed, second_after):
    fleet = Fleet(["agg-a"], seed=seed)
    fleet.run(2)  # agg-a alone and ready
    fleet.submit("j")
    fleet.run(second_after)
    fleet.add("agg-b", jobs=["j"])
    fleet.run(10 * T.settle_s)
    assert len([s for s in fleet.started if s[0] == "j"]) == 1
    assert len(fleet.holders("j")) == 1 and not fleet.stopped


def test_a_lone_aggregator_starts_a_job_within_a_tick_of_its_spec():
    fleet = Fleet(["agg-a"], seed=0)
    fleet.run(2)
    fleet.submit("j")
    submitted = fleet.now
    fleet.run(T.settle_s)
    ((job, name, epoch),) = fleet.started
    assert (job, name, epoch) == ("j", "agg-a", 1)
    assert fleet.retained[("j", "agg-a")].since - submitted <= TICK + 1e-9


def test_a_lone_aggregator_holds_a_job_when_it_arrives_not_at_its_next_tick():
    """The job's arrival steps the book (as a tick would): alone, the bid is decided at once, so
    round 1 does not wait up to a tick (0.2 s) on every job's clock."""
    book = ClaimBook("agg-a", T)
    book.on_connected(0.0)
    assert book.on_tick(5.0) == []  # ready, nothing to do
    actions = book.on_job("j", now=5.05)
    assert [type(a) for a in actions] == [Publish, Publish, Start] and "j" in book.held
    assert [a.claim.state for a in actions if isinstance(a, Publish)] == ["bid", "held"]
    fleet = ClaimBook("agg-b", T)
    fleet.on_peer("agg-c", True)  # a fleet: the bid is published at once, decided after the window
    fleet.on_connected(0.0)
    (bid,) = fleet.on_job("j", now=5.0)
    assert bid.claim.state == "bid" and "j" not in fleet.held
