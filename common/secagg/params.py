"""From a job's model and round to the protocol's inputs: the round's public config, the update
delta as one flat vector, and back.

Why deltas: `clip` bounds what a site contributes, which is meaningful for the change a round
makes (as client-level DP clips it), not for raw weights of any magnitude.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from common.codec import as_float, from_float
from common.secagg.config import SecAggConfig
from common.secagg.encoding import Encoding

Params = dict[str, Any]  # torch tensors, or tensors held as numpy in the node (common.codec.TorchArray)


def round_seed(job: str, round_: int) -> bytes:
    """The public seed of the round's neighbour graph: every party derives the same one."""
    return hashlib.sha256(f"fbm-secagg-graph\x00{job}\x00{round_}".encode()).digest()


def size_of(reference: Params) -> int:
    return sum(math.prod(t.shape) for t in reference.values())


def round_config(job: str, round_: int, threshold: int, neighbours: int, clip: float, max_count: int,
                 reference: Params, sites: int) -> SecAggConfig:
    """The round's public parameters; `sites`: how many are expected (the encoding's n)."""
    return SecAggConfig(job, round_, threshold, neighbours, Encoding(clip, max(sites, 1), max_count),
                        size_of(reference), round_seed(job, round_))


def flat_delta(params: Params, reference: Params) -> np.ndarray:
    """params - reference, every tensor flattened in the reference's key order (float64)."""
    if set(params) != set(reference):
        raise ValueError(f"update has tensors {sorted(set(params) ^ set(reference))} the model has not, or lacks them")
    parts = [(as_float(params[k]).astype(np.float64) - as_float(reference[k]).astype(np.float64)).reshape(-1)
             for k in reference]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten_mean(weighted_sum: np.ndarray, total_count: int, reference: Params) -> Params:
    """reference + weighted_sum / total_count, shaped and typed like the reference."""
    mean = np.asarray(weighted_sum, dtype=np.float64) / max(total_count, 1)
    out, at = {}, 0
    for k, t in reference.items():
        n = math.prod(t.shape)
        out[k] = from_float(as_float(t).astype(np.float64) + mean[at:at + n].reshape(tuple(t.shape)), t)
        at += n
    return out
