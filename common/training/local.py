"""What a node does locally besides plain SGD: the node half of FedProx, SCAFFOLD and ADMM,
client-level differential privacy, federated standardization, and the validation split.

Pure functions over tensors, and the local algorithms as objects (`SGD`, `FedProx`, `ADMM`,
`Scaffold`, named as the aggregator's rules they pair with; client-level DP is a post-step,
`client_dp`); `node.worker` calls them around its training loop. The aggregator half of each
algorithm is in `aggregators/rules/`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from common.training.args import TrainingArgs
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
    if n_val == 0:  # no split (the default): the same indices, without a generator and a permutation
        return torch.arange(n), torch.arange(0)  # (7% of the simulated fleet's CPU at 10,000 sites)
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


# --- the local algorithms: the node half of each rule, by the rule's name --------------------


class SGD:
    """Plain local SGD (FedAvg's node half, and of every rule without a node half of its own).

    A local algorithm is made once per round from the training args, the received model and
    what it kept from the last round; the training loop adds its `penalty` to each batch's loss
    and calls `correct_` between backward and step; `finish` gives what the node sends (params,
    extra for the aggregator) and what it keeps for the next round. Each class is named as the
    aggregator's rule it pairs with (aggregators/rules: FedProx, Scaffold, ADMM).
    """

    name: ClassVar[str] = "sgd"

    def __init__(self, args: TrainingArgs, start: Params, state: dict[str, Params], extra: Params) -> None:
        self.args = args

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def correct_(self, model: torch.nn.Module) -> None:
        return None

    def finish(self, start: Params, end: Params, params: Params, steps: int) -> tuple[Params, Params, dict[str, Params]]:
        """(params to send, extra to send, local state to keep) after `steps` local steps."""
        return params, {}, {}


class FedProx(SGD):
    """mu/2 ||w - w_global||^2 added to the loss (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, args: TrainingArgs, start: Params, state: dict[str, Params], extra: Params) -> None:
        super().__init__(args, start, state, extra)
        self.anchor, self.strength = start, args.mu

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return proximal_penalty(model, self.anchor, self.strength)


class ADMM(FedProx):
    """Consensus ADMM, scaled form: dual ascent when the new consensus z arrives, then rho/2
    ||w - (z - u_i)||^2 in the loss; the node sends x_i + u_i and keeps x_i and u_i."""

    name = "admm"

    def __init__(self, args: TrainingArgs, start: Params, state: dict[str, Params], extra: Params) -> None:
        super().__init__(args, start, state, extra)
        u = state.get("u") or {k: torch.zeros_like(v) for k, v in start.items()}
        if "x" in state:  # the new consensus z arrived: dual ascent with our last x
            u = admm_dual(u, state["x"], start)
        self.u, self.anchor, self.strength = u, {k: start[k] - u[k] for k in start}, args.rho

    def finish(self, start: Params, end: Params, params: Params, steps: int) -> tuple[Params, Params, dict[str, Params]]:
        u = self.u  # the server averages x_i + u_i
        return {k: (v + u[k] if k in u else v) for k, v in params.items()}, {}, {"x": end, "u": u}


class Scaffold(SGD):
    """SCAFFOLD (Karimireddy et al. 2020): gradients corrected by c - c_i; option II control
    update; the node sends its control's change as extra and keeps c_i."""

    name = "scaffold"

    def __init__(self, args: TrainingArgs, start: Params, state: dict[str, Params], extra: Params) -> None:
        super().__init__(args, start, state, extra)
        self.c_global = {k: extra.get(SCAFFOLD_PREFIX + k, torch.zeros_like(v)) for k, v in start.items()}
        self.c_local = state.get("c") or {k: torch.zeros_like(v) for k, v in start.items()}

    def correct_(self, model: torch.nn.Module) -> None:
        scaffold_correct_(model, self.c_global, self.c_local)

    def finish(self, start: Params, end: Params, params: Params, steps: int) -> tuple[Params, Params, dict[str, Params]]:
        c_new = scaffold_new_control(self.c_global, self.c_local, start, end, steps, self.args.lr)
        return params, {SCAFFOLD_PREFIX + k: c_new[k] - self.c_local[k] for k in c_new}, {"c": c_new}


ALGORITHMS: dict[str, type[SGD]] = {cls.name: cls for cls in (SGD, FedProx, ADMM, Scaffold)}


def local_algorithm(training_args: dict[str, Any], start: Params, state: dict[str, Params], extra: Params) -> SGD:
    """The job's local algorithm for this round (LocalError if the nodes do not run it)."""
    return ALGORITHMS[algorithm_of(training_args)](TrainingArgs.of(training_args), start, state, extra)


def client_dp(params: Params, received: Params, training_args: dict[str, Any]) -> Params:
    """Client-level DP as a post-step: the round's change clipped and noised (noise from the OS
    CSPRNG, never the job's seed; the pre-clip norm depends on the data un-noised, so it is not
    reported). Params unchanged without client-level DP."""
    if dp_mode(training_args) != "client":
        return params
    dp = TrainingArgs.of(training_args).dp or {}
    delta = {k: params[k] - received[k] for k in params}
    noised, _ = clip_and_noise(delta, float(dp["clip"]), float(dp["sigma"]))
    return {k: received[k] + noised[k] for k in params}
