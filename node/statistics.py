"""Sufficient statistics of a local dataset, for federated analytics: no row leaves the node.

A researcher combines every node's count, sums and sums of squares into the global mean and
standard deviation (exactly the pooled values), and histograms on shared bin edges. What
could single out a patient is held back by the site's `StatisticsPolicy`: statistics over too
few rows are refused; a minimum or maximum is one patient's value, so extremes are off unless
the site allows them; histograms have a bounded number of bins and every cell counting fewer
than `min_cell_count` patients is reported as 0 (fine bins would otherwise reveal each value).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from node.datasets import LoadedData
from node.policy import StatisticsPolicy


class StatisticsRefused(ValueError):
    """The node will not compute this statistic; the message says why."""


def check_request(policy: StatisticsPolicy, bins: int, ranges: list[list[float]] | None) -> None:
    """Refuse what the policy forbids before any data is read (cheap, in the node process)."""
    if bins < 0 or bins > policy.max_bins:
        raise StatisticsRefused(f"{bins} histogram bins asked; this node allows 0 to {policy.max_bins}")
    if bins and not ranges:
        raise StatisticsRefused("histograms need `ranges` (shared bin edges across nodes)")
    for pair in ranges or []:
        if len(pair) != 2 or not all(math.isfinite(float(v)) for v in pair) or float(pair[0]) >= float(pair[1]):
            raise StatisticsRefused("each histogram range must be two finite numbers [low, high] with low < high")


def sufficient_statistics(data: LoadedData, *, min_rows: int, bins: int = 0,
                          ranges: list[list[float]] | None = None,
                          policy: StatisticsPolicy | None = None) -> dict[str, Any]:
    """count, per-feature sum and sum of squares (float64); min/max and histograms as the
    site's policy allows.

    Features are the columns of `x` flattened per sample (an image's pixels, a CSV's columns).
    Histograms need `ranges` (one [low, high] per feature, or one for all) so that every node
    uses the same bin edges and the counts can be added.
    """
    policy = policy or StatisticsPolicy()
    check_request(policy, bins, ranges)
    x = data.x.reshape(len(data.x), -1).double().numpy()
    n = x.shape[0]
    if n < min_rows:
        raise StatisticsRefused(f"the dataset has {n} rows; this node computes statistics over at least {min_rows}")
    if x.shape[1] > policy.max_features:
        raise StatisticsRefused(f"the data has {x.shape[1]} features; this node computes statistics of at most "
                                f"{policy.max_features}")
    out: dict[str, Any] = {"n": n, "sum": x.sum(axis=0).tolist(), "sumsq": np.square(x).sum(axis=0).tolist()}
    if policy.extremes == "exact":
        out["min"], out["max"] = x.min(axis=0).tolist(), x.max(axis=0).tolist()
    if bins:
        out["hist"], out["suppressed_cells"] = _histograms(x, bins, ranges or [], policy.min_cell_count)
    return out


def _histograms(x: np.ndarray, bins: int, ranges: list[list[float]], min_cell: int) -> tuple[list[list[int]], int]:
    """Counts on shared edges, each cell under `min_cell` set to 0; and how many were."""
    if len(ranges) not in (1, x.shape[1]):
        raise StatisticsRefused(f"`ranges` must hold one [low, high] or one per feature ({x.shape[1]})")
    per_feature = ranges if len(ranges) == x.shape[1] else [ranges[0]] * x.shape[1]
    hist = np.stack([np.histogram(x[:, j], bins=bins, range=(float(lo), float(hi)))[0]
                     for j, (lo, hi) in enumerate(per_feature)])
    small = (hist > 0) & (hist < min_cell)
    hist[small] = 0
    return hist.tolist(), int(small.sum())
