"""Many sites' rounds of one job trained in one batched pass: the simulated fleet's trainer.

`node.worker.train` trains one site's round with torch's per-call overhead (building the model,
loading its state, forward, backward, step): ~0.5 ms for the zoo's tiny models, 39% of the
simulated fleet's CPU at 10,000 sites (docs/performance.md). Sites of one job and round start
from the same model and shuffle with the same seed (the job's, not the site's), so sites with
the same sample count take the same batch order: their rounds are one computation over stacked
per-site parameters (torch.func: vmap of the gradient of the plan's own `training_step`).

Each site's result equals `train`'s within float rounding (sums over a batch taken in another
order by batched kernels: within 1e-6 absolute for the zoo's small models; tested against the
serial path in tests/unit/test_batched_training.py). Batched only where that holds: the plain
`sgd` local algorithm with torch's SGD optimizer (no weight decay, no Nesterov), no validation
split, no differential privacy, a model without buffers, a plan whose step draws no random
numbers (vmap refuses them); anything else returns None and the caller trains site by site.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from common.training import local
from node import plan_rounds
from node.datasets import LoadedData
from node.worker import _batches, _split, seed_torch, to_arrays, to_tensors

Params = dict[str, torch.Tensor]


class _Step(nn.Module):
    """The plan's `training_step` as a module, so `functional_call` can swap the model's parameters."""

    def __init__(self, plan: Any, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.plan = plan

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.plan.training_step(self.model, x, y)


def _plain_sgd(targs: dict[str, Any], plan_cls: type) -> bool:
    """Whether the job's local training is the one this module reproduces (see the docstring)."""
    if plan_rounds.has_own_loop(plan_cls):
        return False
    try:
        args = local.TrainingArgs.of(targs)
        algorithm = local.algorithm_of(targs)
    except local.LocalError:
        return False  # the serial path raises it with its own words
    return algorithm == "sgd" and args.dp is None and args.val_fraction == 0


def _sgd_settings(optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
    """(lr, momentum) of a plain torch SGD over one parameter group, None for anything else."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    if g["weight_decay"] or g["nesterov"] or g["dampening"] or g["maximize"]:
        return None
    return float(g["lr"]), float(g["momentum"])


def train_many(task: dict[str, Any], datas: list[LoadedData], plan_cls: type) -> list[dict[str, Any]] | None:
    """`[train(task, data, plan_cls) for data in datas]`, batched per sample count; None if the
    job is not one this batches exactly (the caller then trains each site with `train`)."""
    targs = task["training_args"]
    if not datas or not _plain_sgd(targs, plan_cls):
        return None
    args = local.TrainingArgs.of(targs)
    plan = plan_cls(task["model_args"], targs)
    seed = args.seed * 1_000_003 + int(task["round"])
    seed_torch(seed)
    model = plan.build_model()
    model.load_state_dict(to_tensors(task["params"]))
    settings = _sgd_settings(plan.optimizer(model))
    names = [k for k, _ in model.named_parameters()]
    if settings is None or list(model.buffers()) or sorted(model.state_dict()) != sorted(names):
        return None
    model.train()
    splits = [_split(data, args)[:2] for data in datas]
    results: list[dict[str, Any] | None] = [None] * len(datas)
    by_n: dict[int, list[int]] = {}
    for i, (x, _) in enumerate(splits):
        by_n.setdefault(len(x), []).append(i)
    try:
        for idx in by_n.values():
            for i, result in zip(idx, _train_group(plan, model, [splits[i] for i in idx], args, seed, settings),
                                 strict=True):
                results[i] = result
    except RuntimeError:  # e.g. vmap refusing a random draw in the plan's step: train site by site
        return None
    return results  # type: ignore[return-value]


def _train_group(plan: Any, model: nn.Module, splits: list[tuple[torch.Tensor, torch.Tensor | None]],
                 args: local.TrainingArgs, seed: int, settings: tuple[float, float]) -> list[dict[str, Any]]:
    """The rounds of sites with the same sample count: `worker._train_plain`'s loop over stacked
    parameters (same batch order: the same seeded generator; same SGD arithmetic)."""
    start = time.perf_counter()
    lr, momentum = settings
    sites = len(splits)
    x = torch.stack([s[0] for s in splits])
    y = torch.stack([s[1] for s in splits]) if splits[0][1] is not None else None
    params = {k: v.detach().unsqueeze(0).expand(sites, *v.shape).clone() for k, v in model.named_parameters()}
    step = _Step(plan, model)

    def loss_of(p: Params, xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
        return torch.func.functional_call(step, {f"model.{k}": v for k, v in p.items()}, (xb, yb))

    grad_and_loss = torch.func.vmap(torch.func.grad_and_value(loss_of), in_dims=(0, 0, 0 if y is not None else None))
    gen = torch.Generator().manual_seed(seed)
    bufs: Params = {}
    loss_sum, seen, steps = torch.zeros(sites, dtype=torch.float64), 0, 0
    for _ in range(args.epochs):
        loss_sum, seen = torch.zeros(sites, dtype=torch.float64), 0
        for index in _batches(x.shape[1], args.batch_size, gen):
            grads, loss = grad_and_loss(params, x[:, index], y[:, index] if y is not None else None)
            params = _sgd_step(params, grads, bufs, lr, momentum)
            loss_sum += loss.detach().double() * len(index)
            seen += len(index)
            steps += 1
            if args.max_batches is not None and steps >= args.max_batches:
                break
    share = (time.perf_counter() - start) / sites
    return [_result({k: v[i].clone() for k, v in params.items()}, x.shape[1], float(loss_sum[i]) / max(seen, 1),
                    steps, share, args) for i in range(sites)]


def _sgd_step(params: Params, grads: Params, bufs: Params, lr: float, momentum: float) -> Params:
    """torch.optim.SGD's update (dampening 0): the momentum buffer starts as the first gradient."""
    out = {}
    for k, p in params.items():
        g = grads[k]
        if momentum:
            bufs[k] = g.clone() if k not in bufs else bufs[k].mul_(momentum).add_(g)
            g = bufs[k]
        out[k] = p.add(g, alpha=-lr)
    return out


def _result(params: Params, n: int, train_loss: float, steps: int, train_s: float,
            args: local.TrainingArgs) -> dict[str, Any]:
    """One site's result in `train`'s shape (its `train_s` is its share of the batch's time)."""
    metrics: dict[str, float] = {"train_loss": train_loss}
    for name in args.report_norms:
        if name in params:
            metrics[f"norm:{name}"] = float(params[name].double().norm())
    return {"params": to_arrays(params), "n_samples": n, "metrics": metrics, "timings": {"train_s": train_s},
            "steps": steps, "extra": {}, "local_state": {}}
