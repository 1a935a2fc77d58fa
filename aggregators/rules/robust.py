"""Byzantine-robust rules: they need every update of the round at once (not streaming), so
memory is N x model; `max_updates` bounds it and refuses more than that many.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018 (coordinate-wise median and trimmed mean); Blanchard et al., "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017 (Krum, Multi-Krum).
"""

from __future__ import annotations

import math
from typing import Any

from aggregators.rules.base import AggregationRule
from aggregators.rules.functions import (
    Params,
    check_like,
    coordinate_median,
    multi_krum,
    trimmed_mean,
)


class _Buffered(AggregationRule):
    streaming = False

    def __init__(self, max_updates: int = 1000, **args: Any) -> None:
        super().__init__(**args)
        self.max_updates = int(max_updates)

    def begin_round(self, global_params: Params) -> None:
        self._like = global_params
        self._updates: list[Params] = []
        self._weights: list[float] = []
        self._nodes: list[str] = []

    def add(self, params: Params, n_samples: int, node: str, extra: Params | None = None) -> None:
        if len(self._updates) >= self.max_updates:
            raise ValueError(f"{self.name} holds at most {self.max_updates} updates per round (max_updates)")
        check_like(params, self._like)
        self._updates.append(params)
        self._weights.append(float(n_samples))
        self._nodes.append(node)

    def state_dict(self) -> dict:
        return {"like": self._like, "updates": self._updates, "weights": self._weights, "nodes": self._nodes}

    def load_state_dict(self, state: dict) -> None:
        if "updates" in state:
            self._like, self._updates = state["like"], list(state["updates"])
            self._weights, self._nodes = list(state["weights"]), list(state["nodes"])

    def _need(self, n: int) -> None:
        if len(self._updates) < n:
            raise ValueError(f"{self.name} needs at least {n} update(s), got {len(self._updates)}")


class FedMedian(_Buffered):
    """Coordinate-wise median of the updates (unweighted): up to half can be arbitrary."""

    name = "fedmedian"

    def end_round(self) -> Params:
        self._need(1)
        return coordinate_median(self._updates)


class TrimmedMean(_Buffered):
    """Coordinate-wise mean after dropping the `beta` fraction largest and smallest values
    (args: beta, default 0.2; at least one value is trimmed from each end when beta > 0)."""

    name = "trimmedmean"

    def __init__(self, beta: float = 0.2, **args: Any) -> None:
        super().__init__(**args)
        if not 0 <= beta < 0.5:
            raise ValueError("trimmedmean: beta must be in [0, 0.5)")
        self.beta = float(beta)

    def end_round(self) -> Params:
        self._need(1)
        n = len(self._updates)
        trim = min(math.ceil(self.beta * n), (n - 1) // 2) if self.beta > 0 else 0
        return trimmed_mean(self._updates, trim)


class Krum(_Buffered):
    """Krum / Multi-Krum: keep the `m` updates closest to their n - f - 2 neighbours (f =
    `byzantine`, the number of attackers tolerated) and average them sample-weighted;
    m = 1 is Krum (args: byzantine, m)."""

    name = "krum"

    def __init__(self, byzantine: int = 1, m: int = 1, **args: Any) -> None:
        super().__init__(**args)
        self.byzantine, self.m = int(byzantine), int(m)
        if self.byzantine < 0 or self.m < 1:
            raise ValueError("krum: byzantine >= 0 and m >= 1")
        self.selected: list[str] = []

    def end_round(self) -> Params:
        self._need(self.byzantine + 3)
        params, chosen = multi_krum(self._updates, self._weights, self.byzantine, min(self.m, len(self._updates)))
        self.selected = [self._nodes[i] for i in chosen]
        return params

    def round_notes(self) -> dict[str, Any]:
        return {"selected": list(self.selected)} if self.selected else {}
