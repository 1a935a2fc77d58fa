"""Pure aggregation maths: dicts of tensors in, dicts of tensors out. No state, no I/O."""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def zeros_like(params: Params) -> Params:
    """A float64 accumulator shaped like `params` (float64 keeps long sums exact enough)."""
    return {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}


def add_weighted_(acc: Params, params: Params, weight: float) -> None:
    """acc += weight * params, in place (streaming: one update at a time)."""
    for key, value in params.items():
        acc[key].add_(value.to(torch.float64), alpha=weight)


def divide(acc: Params, total: float, like: Params) -> Params:
    """acc / total, cast back to the dtypes of `like` (integer buffers are rounded)."""
    out: Params = {}
    for key, value in acc.items():
        mean = value / total
        dtype = like[key].dtype
        out[key] = (mean.round() if not dtype.is_floating_point else mean).to(dtype)
    return out


def weighted_mean(updates: list[tuple[Params, float]]) -> Params:
    """The sample-weighted mean of several parameter sets (the FedAvg formula, all at once)."""
    if not updates:
        raise ValueError("no updates to average")
    first = updates[0][0]
    acc = zeros_like(first)
    for params, weight in updates:
        add_weighted_(acc, params, weight)
    return divide(acc, sum(w for _, w in updates), first)
