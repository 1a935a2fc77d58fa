"""A third-party aggregation rule for fedbiomq: the geometric median (robust aggregation).

Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022
(RFA, smoothed Weiszfeld iterations). Installed as its own package, it registers itself in the
`fedbiomq.aggregators` entry-point group; fedbiomq is not edited.
"""

from __future__ import annotations

import torch

from aggregators.rules import AggregationRule
from aggregators.rules.functions import Params, cast_like, flatten


def geometric_median(points: torch.Tensor, weights: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """Weiszfeld: z <- sum(w_i x_i / max(eps, |x_i - z|)) / sum(w_i / max(eps, |x_i - z|)). Pure."""
    z = (weights[:, None] * points).sum(0) / weights.sum()
    for _ in range(iterations):
        dist = (points - z).norm(dim=1).clamp_min(eps)
        beta = weights / dist
        z = (beta[:, None] * points).sum(0) / beta.sum()
    return z


class GeometricMedian(AggregationRule):
    """Geometric median of the updates (Weiszfeld), weighted by sample count (args: iterations, eps)."""

    name = "geomedian"
    streaming = False  # needs every update of the round

    def __init__(self, iterations: int = 10, eps: float = 1e-6) -> None:
        self.iterations, self.eps = int(iterations), float(eps)

    def begin_round(self, global_params: Params) -> None:
        self._like, self._updates, self._weights = global_params, [], []

    def add(self, params: Params, n_samples: int, node: str, extra: Params | None = None) -> None:
        self._updates.append(params)
        self._weights.append(float(n_samples))

    def end_round(self) -> Params:
        if not self._updates:
            raise ValueError("no update was added this round")
        points = torch.stack([flatten(u) for u in self._updates])
        z = geometric_median(points, torch.tensor(self._weights, dtype=torch.float64), self.iterations, self.eps)
        out, offset = {}, 0
        for key, ref in self._like.items():
            out[key] = z[offset : offset + ref.numel()].reshape(ref.shape)
            offset += ref.numel()
        return cast_like(out, self._like)

    def state_dict(self) -> dict:
        return {"like": self._like, "updates": self._updates, "weights": self._weights}

    def load_state_dict(self, state: dict) -> None:
        if "updates" in state:
            self._like, self._updates, self._weights = state["like"], list(state["updates"]), list(state["weights"])
