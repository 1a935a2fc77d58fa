"""FedAvg and FedProx: the sample-weighted mean of the nodes' parameters."""

from __future__ import annotations

from aggregators.rules.base import AggregationRule
from aggregators.rules.functions import Params, add_weighted_, divide, zeros_like


class FedAvg(AggregationRule):
    """Sample-weighted mean of the nodes' parameters, folded as they arrive.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017.
    """

    name = "fedavg"

    def begin_round(self, global_params: Params) -> None:
        self._like = global_params
        self._acc = zeros_like(global_params)
        self._total = 0.0

    def add(self, params: Params, n_samples: int, node: str, extra: Params | None = None) -> None:
        add_weighted_(self._acc, params, float(n_samples))
        self._total += n_samples

    def state_dict(self) -> dict:
        return {"like": self._like, "acc": self._acc, "total": self._total}

    def load_state_dict(self, state: dict) -> None:
        if "acc" in state:
            self._like, self._acc, self._total = state["like"], state["acc"], float(state["total"])

    def end_round(self) -> Params:
        if self._total <= 0:
            raise ValueError("no update was added this round")
        return divide(self._acc, self._total, self._like)


class FedProx(FedAvg):
    """FedAvg on the server; nodes add the proximal term mu/2 ||w - w_global||^2 to their loss
    (`mu` in the training args), which keeps heterogeneous nodes from drifting apart.

    Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
    """

    name = "fedprox"
