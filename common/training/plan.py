"""A training plan: a torch model plus how to train and evaluate it on one batch.

A researcher writes one small class; the node does the rest (data, batching, epochs, timing):

    class MyPlan(TrainingPlan):
        def build_model(self):
            return MyNet(**self.model_args)
        def training_step(self, model, x, y):
            return F.cross_entropy(model(x), y.long())
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.training.args import TrainingArgs


class TrainingPlan:
    """Base class; override `build_model` and `training_step`, optionally the rest."""

    #: what the plan expects as `x`: "features" (N, F) floats, "images" (N, C, H, W) floats in [0, 1], or
    #: "volumes" (N, C, D, H, W) (medical images; `common.training.imaging`)
    input_kind = "features"
    #: classification plans report accuracy in `validation_step`
    task = "classification"
    #: local algorithms this plan can run (a plan with its own training loop narrows this)
    supported_algorithms = ("sgd", "fedprox", "scaffold", "admm")

    def __init__(self, model_args: dict[str, Any] | None = None, training_args: dict[str, Any] | None = None) -> None:
        self.model_args = dict(model_args or {})
        self.training_args = dict(training_args or {})

    def build_model(self) -> nn.Module:
        raise NotImplementedError("a training plan must build its model")

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        args = TrainingArgs.of(self.training_args)
        name = args.optimizer.lower()
        if name == "adam":
            return torch.optim.Adam(model.parameters(), lr=args.lr)
        if name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        raise ValueError(f"unknown optimizer {name!r} (sgd or adam)")

    def training_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The loss of one batch (a scalar tensor)."""
        raise NotImplementedError

    def validation_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        """Metrics of one batch, summed over its samples (the node divides by the sample count)."""
        loss = self.training_step(model, x, y)
        return {"loss": float(loss) * len(x)}
