"""From a job's model and round to the protocol's inputs: the round's public config, the update
delta as one flat vector, and back.

Why deltas: `clip` bounds what a site contributes, which is meaningful for the change a round
makes (as client-level DP clips it), not for raw weights of any magnitude.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from common.secagg.config import SecAggConfig
from common.secagg.encoding import Encoding

Params = dict[str, torch.Tensor]


def round_seed(job: str, round_: int) -> bytes:
    """The public seed of the round's neighbour graph: every party derives the same one."""
    return hashlib.sha256(f"fbm-secagg-graph\x00{job}\x00{round_}".encode()).digest()


def size_of(reference: Params) -> int:
    return sum(int(t.numel()) for t in reference.values())


def round_config(job: str, round_: int, threshold: int, neighbours: int, clip: float, max_count: int,
                 reference: Params, sites: int) -> SecAggConfig:
    """The round's public parameters; `sites`: how many are expected (the encoding's n)."""
    return SecAggConfig(job, round_, threshold, neighbours, Encoding(clip, max(sites, 1), max_count),
                        size_of(reference), round_seed(job, round_))


def flat_delta(params: Params, reference: Params) -> np.ndarray:
    """params - reference, every tensor flattened in the reference's key order (float64)."""
    if set(params) != set(reference):
        raise ValueError(f"update has tensors {sorted(set(params) ^ set(reference))} the model has not, or lacks them")
    parts = [(params[k].detach().double() - reference[k].detach().double()).reshape(-1) for k in reference]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def unflatten_mean(weighted_sum: np.ndarray, total_count: int, reference: Params) -> Params:
    """reference + weighted_sum / total_count, shaped and typed like the reference."""
    mean = torch.from_numpy(np.asarray(weighted_sum, dtype=np.float64) / max(total_count, 1))
    out, at = {}, 0
    for k, t in reference.items():
        n = int(t.numel())
        out[k] = (t.double() + mean[at:at + n].reshape(t.shape)).to(t.dtype)
        at += n
    return out
