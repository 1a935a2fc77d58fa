"""Consensus ADMM, the seed paper's alternative federator.

Boyd et al., "Distributed Optimization and Statistical Learning via the Alternating Direction
Method of Multipliers", Found. Trends ML 2011, section 7.1 (global consensus, scaled form).
Each node keeps its dual u_i between rounds and minimises f_i(x) + rho/2 ||x - z + u_i||^2
(`rho` in the training args); it sends x_i + u_i, and the server's consensus is their mean:
z = mean(x_i + u_i). The node then updates u_i += x_i - z when the next model arrives.
"""

from __future__ import annotations

from typing import Any

from aggregators.rules.fedavg import FedAvg
from aggregators.rules.functions import Params, add_weighted_, divide, zeros_like


class ADMM(FedAvg):
    """Consensus ADMM server: z = mean of the nodes' x_i + u_i (args: weighted, default false:
    the textbook unweighted mean; true weighs by sample count)."""

    name = "admm"

    def __init__(self, weighted: bool = False, **args: Any) -> None:
        super().__init__(**args)
        self.weighted = bool(weighted)

    def begin_round(self, global_params: Params) -> None:
        self._like = global_params
        self._acc = zeros_like(global_params)
        self._total = 0.0

    def add(self, params: Params, n_samples: int, node: str, extra: Params | None = None) -> None:
        weight = float(n_samples) if self.weighted else 1.0
        add_weighted_(self._acc, params, weight)
        self._total += weight

    def end_round(self) -> Params:
        if self._total <= 0:
            raise ValueError("no update was added this round")
        return divide(self._acc, self._total, self._like)
