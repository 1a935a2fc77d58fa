"""The rules every party applies to aggregators' job claims (docs/design.md, "Aggregators as
a fleet"): when a lease has lapsed, and when a take-over is one to follow.

Pure functions of the signed claims seen and a time: the aggregators (aggregators/claims.py),
the nodes (node/binding.py) and the researcher's Experiment all decide with these.
"""

from __future__ import annotations

from common.messages import JobClaim

LIVE_STATES = frozenset({"bid", "held"})
SKEW_S = 0.5  # clock difference between machines that nodes and researchers allow (aggregators: FBM_FLEET_SKEW_S)


def newer(a: JobClaim | None, b: JobClaim) -> bool:
    """Whether `b` supersedes `a` (the same aggregator's claims on one job): a later epoch, or
    a later message of the same epoch. A stale copy the broker re-delivers (an old snapshot
    after a hard kill) never replaces what is known."""
    return a is None or (b.epoch, b.issued) > (a.epoch, a.issued)


def live(claim: JobClaim, now: float, skew_s: float) -> bool:
    """A bid or a hold whose lease has not run out (with `skew_s` of clock difference allowed)."""
    return claim.state in LIVE_STATES and now <= claim.lease_until + skew_s


def valid_takeover(bound: JobClaim | None, new: JobClaim, now: float, skew_s: float) -> str | None:
    """Why a node or researcher bound to the holder of `bound` must not follow the aggregator
    that made `new` instead (None: it must follow it).

    `bound` is the newest claim known from the aggregator the job is bound to. A take-over is
    followed only if it is a hold of a later epoch, bid after that lease had run out, and not
    dated in the future: a second aggregator identity cannot take a job whose holder renews
    its lease (the hostile-peer defence of issue 17), only one whose holder is gone."""
    if new.state != "held":
        return f"its claim is {new.state}, not held"
    if bound is None:
        return "no claim of the bound aggregator is known, so no lease is known to have lapsed"
    if bound.state == "finished":
        return "the job finished under the bound aggregator"
    if bound.state == "yielded" and new.epoch >= bound.epoch:
        return None  # the bound aggregator signed that it gave the job up (two holds after a partition)
    if new.epoch <= bound.epoch:
        return f"claim epoch {new.epoch} is not after the bound aggregator's {bound.epoch}"
    if new.since < bound.lease_until:
        return f"bid at {new.since:.1f}, before the bound aggregator's lease ran out at {bound.lease_until:.1f}"
    if new.since > now + skew_s:
        return f"bid at {new.since:.1f}, in the future"
    return None
