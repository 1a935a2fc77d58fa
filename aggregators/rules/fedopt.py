"""Server optimizers: FedAvg's average taken as a pseudo-gradient and fed to Adam, Yogi,
Adagrad or momentum on the server. Streaming: the average is folded as updates arrive.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (FedAdam, FedYogi, FedAdagrad);
Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019 (FedAvgM).
"""

from __future__ import annotations

from typing import Any, ClassVar

from aggregators.rules.fedavg import FedAvg
from aggregators.rules.functions import Params, pseudo_gradient, server_step


class _ServerOptimizer(FedAvg):
    kind: ClassVar[str]
    defaults: ClassVar[dict[str, float]] = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def __init__(self, **args: Any) -> None:
        unknown = set(args) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes {sorted(self.defaults)}, got unknown {sorted(unknown)}")
        self.hyper = {**self.defaults, **{k: float(v) for k, v in args.items()}}
        self._m: Params | None = None
        self._v: Params | None = None

    def end_round(self) -> Params:
        average = super().end_round()
        delta = pseudo_gradient(average, self._like)
        params, self._m, self._v = server_step(self._like, delta, self._m, self._v, kind=self.kind, **self.hyper)
        return params

    def carry_over(self) -> dict:
        return {"m": self._m, "v": self._v}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.carry_over()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._m, self._v = state.get("m"), state.get("v")


class FedAdam(_ServerOptimizer):
    """Adam on the server over the round's averaged update (args: lr, beta1, beta2, tau)."""

    name = "fedadam"
    kind = "adam"


class FedYogi(_ServerOptimizer):
    """Yogi on the server: Adam with an additive, sign-controlled second moment (lr, beta1, beta2, tau)."""

    name = "fedyogi"
    kind = "yogi"


class FedAdagrad(_ServerOptimizer):
    """Adagrad on the server: accumulated squared pseudo-gradients (lr, beta1, tau)."""

    name = "fedadagrad"
    kind = "adagrad"


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum: m = beta1 m + delta; w += lr m (args: lr, beta1)."""

    name = "fedavgm"
    kind = "avgm"
    defaults: ClassVar[dict[str, float]] = {"lr": 1.0, "beta1": 0.9, "beta2": 0.0, "tau": 0.0}
