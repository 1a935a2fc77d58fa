"""The training child process: imports torch once, then trains round after round.

It receives tasks over a pipe and answers each with a result or an error. It holds no broker
credentials and no keys: only the plan, the parameters and the dataset location it is given.
Loaded datasets and plan classes are cached across rounds, so a round costs only training.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from common.messages import PlanRef
from common.training.loader import load_plan_class
from node import datasets
from node.sandbox import SandboxPolicy, confine


def to_arrays(params: dict[str, Any]) -> dict[str, Any]:
    """Tensors as numpy arrays for the pipe between node and child.

    torch's own pickling moves every storage into shared memory (a file and an fd handover
    per tensor), which costs more than training a small model; numpy arrays pickle as plain
    bytes. dtypes numpy lacks (bfloat16) travel as tensors.
    """
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) and v.dtype != torch.bfloat16 else v
            for k, v in params.items()}


def to_tensors(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train(task: dict[str, Any], data: datasets.LoadedData, plan_cls) -> dict[str, Any]:
    """Local training of one round; pure apart from torch's RNG, which is seeded from the task."""
    targs = task["training_args"]
    plan = plan_cls(task["model_args"], targs)
    seed = int(targs.get("seed", 0)) * 1_000_003 + int(task["round"])
    torch.manual_seed(seed)
    model = plan.build_model()
    model.load_state_dict(to_tensors(task["params"]))
    optimizer = plan.optimizer(model)
    epochs = int(targs.get("epochs", 1))
    batch_size = int(targs.get("batch_size", 64))
    max_batches = targs.get("max_batches")
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    start = time.perf_counter()
    model.train()
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for index in _batches(n, batch_size, gen):
            x = data.x[index]
            y = data.y[index] if data.y is not None else None
            optimizer.zero_grad(set_to_none=True)
            loss = plan.training_step(model, x, y)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            steps += 1
            if max_batches is not None and steps >= int(max_batches):
                break
    train_s = time.perf_counter() - start
    params = to_arrays({k: v.detach().clone() for k, v in model.state_dict().items()})
    return {
        "params": params,
        "n_samples": n,
        "metrics": {"train_loss": loss_sum / max(seen, 1)},
        "timings": {"train_s": train_s},
        "steps": steps,
    }


class _Cache:
    def __init__(self) -> None:
        self.data: dict[tuple, datasets.LoadedData] = {}
        self.plans: dict[tuple, type] = {}

    def dataset(self, spec: dict[str, Any]) -> tuple[datasets.LoadedData, float]:
        key = (spec["type"], spec["path"], spec.get("target"), spec.get("labels"))
        if key in self.data:
            return self.data[key], 0.0
        start = time.perf_counter()
        loaded = datasets.load(spec["type"], spec["path"], target=spec.get("target"), labels=spec.get("labels"))
        if len(self.data) >= 2:
            self.data.pop(next(iter(self.data)))
        self.data[key] = loaded
        return loaded, time.perf_counter() - start

    def plan(self, ref: dict[str, Any]) -> type:
        key = (ref.get("zoo"), ref.get("sha256"), ref.get("class_name"))
        if key not in self.plans:
            self.plans[key] = load_plan_class(PlanRef(**ref))
        return self.plans[key]


def warm_up() -> None:
    """Pay torch's one-time costs now, at start-up, not in the first round.

    The first optimizer step of a process imports torch._dynamo and initialises kernels
    (~1 s; with many nodes starting on a few cores, several seconds of round 1).
    """
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
        opt.step()


def serve(conn: Connection) -> None:
    """Child main loop: confine, warm up, then one task in, one answer out, until told to stop."""
    hello = conn.recv()
    torch.set_num_threads(max(1, int(hello["threads"])))
    applied = confine(SandboxPolicy(**hello["policy"]))
    warm_up()
    cache = _Cache()
    conn.send({"ready": True, "sandbox": dataclasses.asdict(applied)})
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        if task.get("op") == "preload":
            try:
                cache.dataset(task["dataset"])
                conn.send({"ok": True})
            except Exception as exc:  # a dataset that no longer loads is reported, not fatal
                conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            data, load_s = cache.dataset(task["dataset"])
            result = train(task, data, cache.plan(task["plan"]))
            result["timings"]["load_s"] = load_s
            conn.send({"ok": True, **result})
        except Exception as exc:  # the plan's bug is reported, not fatal
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def main() -> None:
    """`python -m node.worker --fd N`: started by the node's Trainer, never by hand."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the pipe to the node")
    args = parser.parse_args()
    conn = Connection(args.fd)
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
