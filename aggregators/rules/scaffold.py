"""SCAFFOLD: control variates correct each node's drift under heterogeneous data.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020 (option II control update). The server keeps the control variate c and publishes
it with the model (as `c/<param>` extras); each node keeps its own c_i between rounds,
corrects every local gradient by c - c_i, and returns its new parameters and delta c_i.
"""

from __future__ import annotations

from typing import Any

import torch

from aggregators.rules.fedavg import FedAvg
from aggregators.rules.functions import Params

PREFIX = "c/"


class Scaffold(FedAvg):
    """SCAFFOLD server: x += lr_global * mean(y_i - x); c += (|S| / N) * mean(delta c_i)
    (args: lr_global, default 1; n_nodes: N, default = nodes answering)."""

    name = "scaffold"

    def __init__(self, lr_global: float = 1.0, n_nodes: int | None = None, **args: Any) -> None:
        super().__init__(**args)
        self.lr_global = float(lr_global)
        self.n_nodes = n_nodes
        self._c: Params = {}

    def begin_round(self, global_params: Params) -> None:
        super().begin_round(global_params)
        if not self._c:
            self._c = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_params.items()
                       if v.dtype.is_floating_point}
        self._dc = {k: torch.zeros_like(v) for k, v in self._c.items()}
        self._count = 0

    def add(self, params: Params, n_samples: int, node: str, extra: Params | None = None) -> None:
        deltas = self._control_deltas(extra or {}, node)  # all checked before anything is summed
        super().add(params, n_samples, node)  # checks the params before summing them
        for key, delta in deltas.items():
            self._dc[key].add_(delta)
        self._count += 1

    def _control_deltas(self, extra: Params, node: str) -> Params:
        """The update's control deltas as float64, or ValueError: one missing, mis-shaped,
        not floating point, NaN or Inf would poison the server's control variate."""
        out: Params = {}
        for key, like in self._dc.items():
            name = PREFIX + key
            delta = extra.get(name)
            if delta is None:
                raise ValueError(f"scaffold: the update of {node} lacks the control delta {name}")
            if delta.shape != like.shape:
                raise ValueError(f"scaffold: control delta {name} of {node} has shape {list(delta.shape)}, "
                                 f"expected {list(like.shape)}")
            if not delta.is_floating_point():
                raise ValueError(f"scaffold: control delta {name} of {node} is {delta.dtype}, not floating point")
            if not bool(torch.isfinite(delta).all()):
                kind = "NaN" if bool(torch.isnan(delta).any()) else "Inf"
                raise ValueError(f"scaffold: control delta {name} of {node} contains {kind}")
            out[key] = delta.to(torch.float64)
        return out

    def end_round(self) -> Params:
        average = super().end_round()
        out: Params = {}
        for key, x in self._like.items():
            if x.dtype.is_floating_point:
                step = average[key].to(torch.float64) - x.to(torch.float64)
                out[key] = (x.to(torch.float64) + self.lr_global * step).to(x.dtype)
            else:
                out[key] = average[key]
        n_total = max(self.n_nodes or self._count, self._count)
        for key in self._c:
            self._c[key] = self._c[key] + self._dc[key] / n_total
        return out

    def model_extra(self) -> Params:
        return {PREFIX + k: v.to(torch.float32) for k, v in self._c.items()}

    def carry_over(self) -> dict:
        return {"c": self._c}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "c": self._c, "dc": getattr(self, "_dc", {}), "count": getattr(self, "_count", 0)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._c = state.get("c", {})
        self._dc, self._count = state.get("dc", {}), int(state.get("count", 0))
