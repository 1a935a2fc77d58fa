"""Sufficient statistics of a local dataset, for federated analytics: no row leaves the node.

A researcher combines every node's count, sums and sums of squares into the global mean and
standard deviation (exactly the pooled values), min/max, and histograms on shared bin edges.
A node refuses statistics over fewer rows than its configured minimum, so a statistic can't
single out a patient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from node.datasets import LoadedData


class StatisticsRefused(ValueError):
    """The node will not compute this statistic; the message says why."""


def sufficient_statistics(data: LoadedData, *, min_rows: int, bins: int = 0,
                          ranges: list[list[float]] | None = None) -> dict[str, Any]:
    """count, per-feature sum, sum of squares, min, max (float64), and optional histograms.

    Features are the columns of `x` flattened per sample (an image's pixels, a CSV's columns).
    Histograms need `ranges` (one [low, high] per feature, or one for all) so that every node
    uses the same bin edges and the counts can be added.
    """
    x = data.x.reshape(len(data.x), -1).double().numpy()
    n = x.shape[0]
    if n < min_rows:
        raise StatisticsRefused(f"the dataset has {n} rows; this node computes statistics over at least {min_rows}")
    out: dict[str, Any] = {
        "n": n,
        "sum": x.sum(axis=0).tolist(),
        "sumsq": np.square(x).sum(axis=0).tolist(),
        "min": x.min(axis=0).tolist(),
        "max": x.max(axis=0).tolist(),
    }
    if bins:
        if not ranges:
            raise StatisticsRefused("histograms need `ranges` (shared bin edges across nodes)")
        per_feature = ranges if len(ranges) == x.shape[1] else [ranges[0]] * x.shape[1]
        out["hist"] = [np.histogram(x[:, j], bins=int(bins), range=(float(lo), float(hi)))[0].tolist()
                       for j, (lo, hi) in enumerate(per_feature)]
    return out
