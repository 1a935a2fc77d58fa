"""The job option `secure_aggregation = {threshold, neighbours, clip, max_count}`, checked.

Why a list of rules: under secure aggregation the aggregator sees only the SUM of the updates
and the total count, so only rules that need nothing else can run. Robust rules (median,
trimmed mean, Krum) look at each update, SCAFFOLD and ADMM keep per-node state: refused.
"""

from __future__ import annotations

from common.secagg.config import SecAggError, check_parameters

# rules that fold only the sample-weighted sum of the updates
SUM_ONLY_RULES = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"})


def check_option(threshold: int, neighbours: int, clip: float, max_count: int) -> None:
    """Refuse parameters that are insecure or cannot work, with the reason."""
    check_parameters(threshold, neighbours)
    if not clip > 0:
        raise SecAggError(f"secure_aggregation.clip must be > 0, got {clip}")
    if max_count < 1:
        raise SecAggError(f"secure_aggregation.max_count must be >= 1, got {max_count}")


def check_rule(rule: str) -> None:
    """Refuse a rule that needs more than the sum."""
    if rule not in SUM_ONLY_RULES:
        raise SecAggError(
            f"secure aggregation gives the aggregator only the sum of the updates, and rule {rule!r} "
            f"needs each update (robust rules) or per-node state (SCAFFOLD, ADMM); "
            f"use one of {', '.join(sorted(SUM_ONLY_RULES))}")
