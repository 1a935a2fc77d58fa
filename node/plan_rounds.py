"""A round of a plan that trains itself (`fit_round`, e.g. the scikit-learn plans).

The torch loop in `node.worker.train` knows optimizers, batches and the local algorithms;
a scikit-learn estimator brings its own loop (`partial_fit`). This is the node half for such
plans: the same inputs (global state, the site's data, standardization, validation split)
and the same answer (new state, sample count, metrics) as a torch round.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from common.training import local

Params = dict[str, torch.Tensor]


def has_own_loop(plan_cls: type) -> bool:
    """Plans with `fit_round` train themselves."""
    return callable(getattr(plan_cls, "fit_round", None))


def fit_round(task: dict[str, Any], x_all: torch.Tensor, y_all: torch.Tensor | None, plan_cls: type,
              received: Params) -> dict[str, Any]:
    """One round of `plan_cls.fit_round` on this site's data (tensors in, tensors out)."""
    targs = task["training_args"]
    args = local.TrainingArgs.of(targs)
    if args.dp:
        raise local.LocalError(f"plan {plan_cls.__name__} does not support client-level DP (training_args.dp)")
    if local.algorithm_of(targs) not in plan_cls.supported_algorithms:
        raise local.LocalError(f"plan {plan_cls.__name__} runs only {', '.join(plan_cls.supported_algorithms)}")
    seed = args.seed * 1_000_003 + int(task["round"])
    plan = plan_cls(task["model_args"], targs)
    if args.standardize:
        x_all = local.standardize(x_all, args.standardize["mean"], args.standardize["std"])
    train_idx, val_idx = local.validation_split(len(x_all), args.val_fraction, args.seed)
    x, y = (x_all[train_idx], y_all[train_idx] if y_all is not None else None) if len(val_idx) else (x_all, y_all)
    metrics: dict[str, float] = {}
    if len(val_idx):
        metrics.update({f"val_{k}_global": v for k, v in _score(plan, received, x_all[val_idx], y_all, val_idx).items()})
    start = time.perf_counter()
    params, train_metrics = plan.fit_round(received, x, y, seed)
    train_s = time.perf_counter() - start
    metrics.update(train_metrics)
    if len(val_idx):
        metrics.update({f"val_{k}_local": v for k, v in _score(plan, params, x_all[val_idx], y_all, val_idx).items()})
    return {"params": params, "n_samples": len(x), "metrics": metrics, "timings": {"train_s": train_s},
            "steps": args.epochs, "extra": {}, "local_state": {}}


def _score(plan, params: Params, x: torch.Tensor, y_all: torch.Tensor | None, idx: torch.Tensor) -> dict[str, float]:
    model = plan.build_model()
    model.load_state_dict(params)
    with torch.no_grad():
        sums = plan.validation_step(model, x, y_all[idx] if y_all is not None else None)
    return {k: float(v) / max(len(x), 1) for k, v in sums.items()}
