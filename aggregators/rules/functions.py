"""Pure aggregation maths: dicts of tensors in, dicts of tensors out. No state, no I/O."""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def zeros_like(params: Params) -> Params:
    """A float64 accumulator shaped like `params` (float64 keeps long sums exact enough)."""
    return {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}


def check_like(params: Params, like: Params) -> None:
    """ValueError unless `params` has exactly the names and shapes of `like`. Rules call it
    before changing any sum, so a refused update leaves nothing half-added."""
    if params.keys() != like.keys():
        missing, extra = sorted(like.keys() - params.keys()), sorted(params.keys() - like.keys())
        raise ValueError(f"parameter names differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for key, ref in like.items():
        if params[key].shape != ref.shape:
            raise ValueError(f"{key}: shape {list(params[key].shape)}, expected {list(ref.shape)}")


def add_weighted_(acc: Params, params: Params, weight: float) -> None:
    """acc += weight * params, in place (streaming: one update at a time); every tensor is
    checked before any is added."""
    check_like(params, acc)
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


# --- robust statistics over a stack of updates ------------------------------------------------

def cast_like(values: Params, like: Params) -> Params:
    """Back to the dtypes of `like` (integer buffers are rounded)."""
    return {k: (v.round() if not like[k].dtype.is_floating_point else v).to(like[k].dtype) for k, v in values.items()}


def stack(updates: list[Params], key: str) -> torch.Tensor:
    """The updates' tensors for `key`, stacked on a new first axis, as float64."""
    return torch.stack([u[key].to(torch.float64) for u in updates])


def coordinate_median(updates: list[Params]) -> Params:
    """Per-coordinate median (the mean of the two middle values for an even count)."""
    if not updates:
        raise ValueError("no updates")
    out: Params = {}
    for key in updates[0]:
        s = stack(updates, key)
        n = s.shape[0]
        ordered = s.sort(dim=0).values
        out[key] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return cast_like(out, updates[0])


def trimmed_mean(updates: list[Params], trim: int) -> Params:
    """Per-coordinate mean after dropping the `trim` largest and `trim` smallest values."""
    n = len(updates)
    if n == 0 or 2 * trim >= n:
        raise ValueError(f"cannot trim {trim} from each end of {n} update(s)")
    out: Params = {}
    for key in updates[0]:
        ordered = stack(updates, key).sort(dim=0).values
        out[key] = ordered[trim : n - trim].mean(dim=0)
    return cast_like(out, updates[0])


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1).to(torch.float64) for v in params.values()])


def krum_scores(updates: list[Params], byzantine: int) -> torch.Tensor:
    """Krum score per update: the sum of squared distances to its n - f - 2 nearest others."""
    n = len(updates)
    k = n - byzantine - 2
    if k < 1:
        raise ValueError(f"Krum needs n > f + 2 (n={n}, f={byzantine})")
    flat = torch.stack([flatten(u) for u in updates])
    d2 = torch.cdist(flat, flat).pow(2)
    d2.fill_diagonal_(float("inf"))
    return d2.sort(dim=1).values[:, :k].sum(dim=1)


def multi_krum(updates: list[Params], weights: list[float], byzantine: int, keep: int) -> tuple[Params, list[int]]:
    """The weighted mean of the `keep` updates with the lowest Krum scores, and their indices."""
    scores = krum_scores(updates, byzantine)
    chosen = sorted(scores.argsort()[:keep].tolist())
    return weighted_mean([(updates[i], weights[i]) for i in chosen]), chosen


# --- server optimizers (Reddi et al. 2021): one step on the pseudo-gradient -------------------

def pseudo_gradient(average: Params, current: Params) -> Params:
    """The round's direction: averaged update minus the current global model (float64)."""
    return {k: average[k].to(torch.float64) - current[k].to(torch.float64) for k in current}


def server_step(current: Params, delta: Params, m: Params | None, v: Params | None, *, kind: str, lr: float,
                beta1: float, beta2: float, tau: float) -> tuple[Params, Params, Params | None]:
    """One FedAdam / FedYogi / FedAdagrad / FedAvgM step; returns (params, m, v). Pure."""
    new_m: Params = {}
    new_v: Params = {}
    out: Params = {}
    for key, x in current.items():
        d = delta[key]
        if not x.dtype.is_floating_point:  # counters (BatchNorm) follow the plain average
            out[key] = (x.to(torch.float64) + d).round().to(x.dtype)
            continue
        prev_m = m[key] if m is not None else torch.zeros_like(d)
        if kind == "avgm":
            new_m[key] = beta1 * prev_m + d
            step = new_m[key]
        else:
            new_m[key] = beta1 * prev_m + (1 - beta1) * d
            prev_v = v[key] if v is not None else torch.full_like(d, tau * tau)
            d2 = d * d
            if kind == "adam":
                new_v[key] = beta2 * prev_v + (1 - beta2) * d2
            elif kind == "yogi":
                new_v[key] = prev_v - (1 - beta2) * d2 * torch.sign(prev_v - d2)
            elif kind == "adagrad":
                new_v[key] = prev_v + d2
            else:
                raise ValueError(f"unknown server optimizer {kind!r}")
            step = new_m[key] / (new_v[key].sqrt() + tau)
        out[key] = (x.to(torch.float64) + lr * step).to(x.dtype)
    return out, new_m, (new_v if kind != "avgm" else None)
