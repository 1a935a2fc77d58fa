"""The training child process: serves the rounds of ONE job, on that job's dataset only.

It is started before it knows its job and imports torch meanwhile (our code only, one thread),
then waits for its assignment, confines itself to that job's dataset (`node.sandbox`), warms
up and trains round after round until the node ends the job. One job per process: a plan
cannot read another job's dataset nor patch what another job runs. Node and child talk in
framed msgpack (`common.frames`), never pickle. The child holds no broker credentials and no
keys."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import time
import traceback
from typing import Any

import numpy as np
import torch

from common.frames import recv_frame, send_frame
from common.messages import PlanRef
from common.training import local
from common.training.loader import load_plan_class
from node import datasets, plan_rounds
from node.loaders import prepare
from node.sandbox import SandboxPolicy, confine

Params = dict[str, torch.Tensor]


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


def _evaluate(plan, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> dict[str, float]:
    """The plan's validation metrics over (x, y), averaged per sample."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            yb = y[start : start + batch_size] if y is not None else None
            for key, value in plan.validation_step(model, xb, yb).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    model.train()
    return {k: v / max(len(x), 1) for k, v in sums.items()}


def _float_params(model: torch.nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train(task: dict[str, Any], data: datasets.LoadedData, plan_cls) -> dict[str, Any]:
    """Local training of one round; pure apart from torch's RNG, which is seeded from the task.

    Besides plain SGD it runs the node half of FedProx, SCAFFOLD and ADMM (`algorithm` in the
    training args), holds out a validation split (`val_fraction`) on which it scores the
    received global model and the local result, standardizes features with federated
    statistics (`standardize`), and applies client-level DP (`dp`: clip, sigma).
    """
    targs = task["training_args"]
    algorithm = local.algorithm_of(targs)
    supported = getattr(plan_cls, "supported_algorithms", local.LOCAL_ALGORITHMS)
    if algorithm not in supported:
        raise local.LocalError(f"plan {plan_cls.__name__} does not support the {algorithm!r} local algorithm")
    plan = plan_cls(task["model_args"], targs)
    seed = int(targs.get("seed", 0)) * 1_000_003 + int(task["round"])
    torch.manual_seed(seed)
    model = plan.build_model()
    received = to_tensors(task["params"])
    model.load_state_dict(received)
    state: dict[str, Params] = {k: to_tensors(v) for k, v in (task.get("local_state") or {}).items()}
    extra = to_tensors(task.get("extra") or {})
    x_all, y_all = data.x, data.y
    if targs.get("standardize"):
        x_all = local.standardize(x_all, targs["standardize"]["mean"], targs["standardize"]["std"])
    train_idx, val_idx = local.validation_split(len(x_all), float(targs.get("val_fraction", 0.0)), int(targs.get("seed", 0)))
    if len(val_idx):
        x_train, y_train = x_all[train_idx], (y_all[train_idx] if y_all is not None else None)
    else:  # no split: no copy of the dataset
        x_train, y_train = x_all, y_all
    batch_size = int(targs.get("batch_size", 64))
    metrics: dict[str, float] = {}
    if len(val_idx):
        x_val, y_val = x_all[val_idx], (y_all[val_idx] if y_all is not None else None)
        metrics.update({f"val_{k}_global": v for k, v in _evaluate(plan, model, x_val, y_val, batch_size).items()})

    start_params = _float_params(model)
    anchor: Params | None = None
    strength = 0.0
    if algorithm == "fedprox":
        anchor, strength = start_params, float(targs.get("mu", 0.01))
    elif algorithm == "admm":
        u = state.get("u") or {k: torch.zeros_like(v) for k, v in start_params.items()}
        if "x" in state:  # the new consensus z arrived: dual ascent with our last x
            u = local.admm_dual(u, state["x"], start_params)
        anchor, strength = {k: start_params[k] - u[k] for k in start_params}, float(targs.get("rho", 0.1))
    elif algorithm == "scaffold":
        c_global = {k: extra.get(local.SCAFFOLD_PREFIX + k, torch.zeros_like(v)) for k, v in start_params.items()}
        c_local = state.get("c") or {k: torch.zeros_like(v) for k, v in start_params.items()}

    optimizer = plan.optimizer(model)
    epochs = int(targs.get("epochs", 1))
    max_batches = targs.get("max_batches")
    gen = torch.Generator().manual_seed(seed)
    n = len(x_train)
    start = time.perf_counter()
    model.train()
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for index in _batches(n, batch_size, gen):
            x = x_train[index]
            y = y_train[index] if y_train is not None else None
            optimizer.zero_grad(set_to_none=True)
            loss = plan.training_step(model, x, y)
            objective = loss + local.proximal_penalty(model, anchor, strength) if anchor is not None else loss
            objective.backward()
            if algorithm == "scaffold":
                local.scaffold_correct_(model, c_global, c_local)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            steps += 1
            if max_batches is not None and steps >= int(max_batches):
                break
    train_s = time.perf_counter() - start
    if len(val_idx):
        metrics.update({f"val_{k}_local": v for k, v in _evaluate(plan, model, x_val, y_val, batch_size).items()})
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    end_params = _float_params(model)
    extra_out: Params = {}
    new_state: dict[str, Params] = {}
    if algorithm == "scaffold":
        c_new = local.scaffold_new_control(c_global, c_local, start_params, end_params, steps, float(targs.get("lr", 0.01)))
        extra_out = {local.SCAFFOLD_PREFIX + k: c_new[k] - c_local[k] for k in c_new}
        new_state = {"c": c_new}
    elif algorithm == "admm":
        new_state = {"x": end_params, "u": u}
        params = {k: (v + u[k] if k in u else v) for k, v in params.items()}  # the server averages x_i + u_i
    dp = targs.get("dp")
    if dp:
        delta = {k: params[k] - received[k] for k in params}
        # noise from the OS CSPRNG, never from the job's seed; the pre-clip norm depends on the
        # data un-noised, so it is not reported
        noised, _ = local.clip_and_noise(delta, float(dp["clip"]), float(dp["sigma"]))
        params = {k: received[k] + noised[k] for k in params}
    metrics["train_loss"] = loss_sum / max(seen, 1)
    for name in targs.get("report_norms") or []:  # e.g. the input layer, as in the paper's Figure 3
        if name in params:
            metrics[f"norm:{name}"] = float(params[name].double().norm())
    return {
        "params": to_arrays(params),
        "n_samples": n,
        "metrics": metrics,
        "timings": {"train_s": train_s},
        "steps": steps,
        "extra": to_arrays(extra_out),
        "local_state": {k: to_arrays(v) for k, v in new_state.items()},
    }


def run_task(task: dict[str, Any], data: datasets.LoadedData, plan_cls) -> dict[str, Any]:
    """One round: the data as the job encodes it (tables), trained by the plan's own loop
    (`fit_round`, the scikit-learn plans) or the torch loop of `train`."""
    data = prepare(data, task["training_args"])
    if plan_rounds.has_own_loop(plan_cls):
        result = plan_rounds.fit_round(task, data.x, data.y, plan_cls, to_tensors(task["params"]))
        result = {**result, "params": to_arrays(result["params"])}
    else:
        result = train(task, data, plan_cls)
    result["metrics"].update(data.meta.get("job_metrics") or {})
    return result


class _Cache:
    """The job's dataset and plan class, loaded once for all of its rounds."""

    def __init__(self) -> None:
        self.data: tuple[tuple, datasets.LoadedData] | None = None
        self.plans: dict[tuple, type] = {}

    def dataset(self, spec: dict[str, Any]) -> tuple[datasets.LoadedData, float]:
        key = (spec["type"], spec["path"], spec.get("target"), spec.get("labels"))
        if self.data is not None and self.data[0] == key:
            return self.data[1], 0.0
        start = time.perf_counter()
        loaded = datasets.load(spec["type"], spec["path"], target=spec.get("target"), labels=spec.get("labels"))
        self.data = (key, loaded)
        return loaded, time.perf_counter() - start

    def plan(self, ref: dict[str, Any]) -> type:
        key = (ref.get("zoo"), ref.get("sha256"), ref.get("class_name"))
        if key not in self.plans:
            self.plans[key] = load_plan_class(PlanRef(**ref))
        return self.plans[key]


def preimport() -> None:
    """Import what the first optimizer step would import (torch._dynamo: ~1-2 s), while the
    process is a spare that knows no job: it reads only Python's own files and starts no
    thread (checked by test_every_thread_of_a_jobs_process_is_confined), so it may run before
    `confine`. With it done here, a job's first round does not pay it on the job's clock."""
    import torch._dynamo  # noqa: F401


def warm_up() -> None:
    """Pay torch's remaining one-time costs (kernels, allocator) before the first round.

    After `preimport` this takes ~10 ms; it runs after `confine`, since it may start threads.
    """
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
        opt.step()


MAX_TASK_BYTES = 1 << 36  # from the node: trusted, but a limit all the same


def _tensors_out(result: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays from `train` back as tensors (no copy): they travel in torch's own dtypes."""
    out = {**result, "params": to_tensors(result["params"]), "extra": to_tensors(result["extra"])}
    out["local_state"] = {k: to_tensors(v) for k, v in result["local_state"].items()}
    return out


def _answer(task: dict[str, Any], cache: _Cache) -> dict[str, Any]:
    """One round's answer: the result, or the plan's error (a plan's bug is not fatal)."""
    try:
        data, load_s = cache.dataset(task["dataset"])
        result = run_task(task, data, cache.plan(task["plan"]))
        result["timings"]["load_s"] = load_s
        return {"ok": True, **_tensors_out(result)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def serve(sock: socket.socket, threads: int) -> None:
    """Child main loop: take the job, confine to it, warm up, then one round in, one answer out.

    Torch is imported (at module load) before the job is known; nothing that starts threads
    runs before `confine`, because Landlock binds only the calling thread and those it starts.
    """
    preimport()
    send_frame(sock, {"warm": True})
    job = recv_frame(sock, MAX_TASK_BYTES)
    if not job or job.get("op") != "assign":
        return
    applied = confine(SandboxPolicy(**{**job["policy"], "read_paths": tuple(job["policy"]["read_paths"])}))
    torch.set_num_threads(max(1, threads))
    warm_up()
    send_frame(sock, {"ready": True, "sandbox": dataclasses.asdict(applied)})
    cache = _Cache()
    while True:
        try:
            task = recv_frame(sock, MAX_TASK_BYTES)
        except (OSError, RuntimeError):  # the node closed the pipe
            return
        if not isinstance(task, dict) or task.get("op") == "stop":
            return
        send_frame(sock, _answer(task, cache))


def main() -> None:
    """`python -m node.worker --fd N --threads T`: started by the node's Trainer, never by hand."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the socket to the node")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    try:
        serve(sock, args.threads)
    finally:
        sock.close()


if __name__ == "__main__":
    main()
