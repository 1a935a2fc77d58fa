"""What a node does locally besides plain SGD: the node half of FedProx, SCAFFOLD and ADMM,
client-level differential privacy, federated standardization, and the validation split.

Pure functions over tensors; `node.worker` calls them around its training loop. The
aggregator half of each algorithm is in `aggregators/rules/`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

from common.training.catalog import (  # noqa: F401 - re-exported: where plans and tests look for them
    ALGORITHM_OF_RULE,
    DP_MODES,
    LOCAL_ALGORITHMS,
    SCAFFOLD_PREFIX,
    LocalError,
    algorithm_of,
    dp_mode,
    dp_sgd_schedule,
    train_rows,
)

Params = dict[str, torch.Tensor]

def proximal_penalty(model: torch.nn.Module, anchor: Params, strength: float) -> torch.Tensor:
    """strength/2 * ||w - anchor||^2 over the trainable parameters (FedProx's mu, ADMM's rho)."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad:
            total = total + (p - anchor[name]).pow(2).sum()
    return 0.5 * strength * total


def scaffold_correct_(model: torch.nn.Module, c_global: Params, c_local: Params) -> None:
    """g <- g + c - c_i on every gradient, in place (SCAFFOLD's drift correction)."""
    for name, p in model.named_parameters():
        if p.grad is not None and name in c_global:
            p.grad.add_(c_global[name] - c_local[name])


def scaffold_new_control(c_global: Params, c_local: Params, start: Params, end: Params, steps: int,
                         lr: float) -> Params:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K * lr)."""
    scale = 1.0 / max(1, steps) / lr
    return {k: c_local[k] - c_global[k] + (start[k] - end[k]) * scale for k in c_global}


def admm_dual(u: Params, x_prev: Params, z: Params) -> Params:
    """u_i <- u_i + x_i - z (scaled-form dual ascent, run when the new consensus arrives)."""
    return {k: u[k] + x_prev[k] - z[k] for k in u}


def csprng_normal(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float64 samples from the operating system's CSPRNG (Box-Muller).

    DP noise must not be reproducible by anyone: a generator seeded from the job (which every
    reader of its spec knows) would let them regenerate the noise and subtract it.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * half), dtype=np.uint64) >> np.uint64(11)  # 53 random bits each
    u1 = (raw[:half].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = raw[half:].astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z.reshape(shape))


def clip_and_noise(delta: Params, clip: float, sigma: float,
                   noise: Callable[[tuple[int, ...]], torch.Tensor] = csprng_normal) -> tuple[Params, float]:
    """Client-level DP: scale the whole update to L2 norm <= clip, add N(0, (sigma*clip)^2).

    McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.
    Returns the noised update and its norm before clipping (for tests: it depends on the data,
    so it is never published). `noise` draws standard normals (the OS CSPRNG; tests may fix it).
    """
    floats = {k: v for k, v in delta.items() if v.is_floating_point()}
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in floats.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    out = dict(delta)
    for k, v in floats.items():
        out[k] = (v.double() * factor + noise(tuple(v.shape)).double() * (sigma * clip)).to(v.dtype)
    return out, norm


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a fixed split per dataset and seed, not per round."""
    if not 0 <= fraction < 1:
        raise LocalError("val_fraction must be in [0, 1)")
    n_val = int(round(n * fraction))
    if fraction > 0 and (n_val < 1 or n - n_val < 1):
        raise LocalError(f"val_fraction {fraction} leaves no training or no validation sample out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def standardize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(x - mean) / std per feature, with the federation's global statistics."""
    m = torch.as_tensor(mean, dtype=x.dtype)
    s = torch.as_tensor(std, dtype=x.dtype).clamp_min(1e-12)
    flat = x.reshape(len(x), -1)  # features as the statistics saw them (an image's pixels)
    if flat.shape[1] != m.numel():
        raise LocalError(f"standardize: {m.numel()} feature statistics for data of shape {list(x.shape)}")
    return ((flat - m) / s).reshape(x.shape)
