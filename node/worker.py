"""The training child process: serves the rounds of ONE job, on that job's dataset only.

It is forked for its job from the node's training template (`node.zygote`: torch imported, our
code only, one thread, nothing secret), confines itself to that job's dataset (`node.sandbox`)
right after the fork, warms up and trains round after round until the node ends the job. One job per process: a plan
cannot read another job's dataset nor patch what another job runs. Node and child talk in
framed msgpack (`common.frames`), never pickle. The child holds no broker credentials and no
keys."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
import traceback
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.frames import recv_frame, send_frame
from common.messages import PlanRef
from common.training import local
from common.training.loader import load_plan_class
from node import datasets, plan_rounds, sched
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


def seed_torch(seed: int) -> None:
    """`torch.manual_seed(seed)`, minus its cost where there is no accelerator: for CUDA, XPU and
    MTIA each it formats the caller's stack for a lazy call (0.1-0.2 ms, a third of a tiny
    model's round: the simulated fleet trains 10,000 a round). Training here is CPU-only, and
    the CPU generator is seeded the same either way."""
    if torch.accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(int(seed))


def _float_params(model: torch.nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train(task: dict[str, Any], data: datasets.LoadedData, plan_cls) -> dict[str, Any]:
    """Local training of one round; pure apart from torch's RNG, which is seeded from the task.

    Besides plain SGD it runs the node half of FedProx, SCAFFOLD and ADMM (`algorithm` in the
    training args), holds out a validation split (`val_fraction`) on which it scores the
    received global model and the local result, standardizes features with federated
    statistics (`standardize`), and applies client-level DP (`dp`: clip, sigma) or sample-level
    DP-SGD with Opacus (`dp`: mode "sample", noise_multiplier, max_grad_norm).
    """
    targs = task["training_args"]
    args = local.TrainingArgs.of(targs)
    _check_algorithm(targs, plan_cls)
    plan = plan_cls(task["model_args"], targs)
    seed = args.seed * 1_000_003 + int(task["round"])
    seed_torch(seed)
    model = plan.build_model()
    received = to_tensors(task["params"])
    model.load_state_dict(received)
    x_train, y_train, val = _split(data, args)
    batch_size = args.batch_size
    metrics: dict[str, float] = {}
    if val is not None:
        metrics.update({f"val_{k}_global": v for k, v in _evaluate(plan, model, *val, batch_size).items()})
    start_params = _float_params(model)
    state = {k: to_tensors(v) for k, v in (task.get("local_state") or {}).items()}
    algorithm = local.local_algorithm(targs, start_params, state, to_tensors(task.get("extra") or {}))
    start = time.perf_counter()
    model.train()
    if local.dp_mode(targs) == "sample":
        loss_sum, seen, steps = _train_dp_sgd(plan, model, x_train, y_train, args)
    else:
        loss_sum, seen, steps = _train_plain(plan, model, x_train, y_train, args, seed, algorithm)
    train_s = time.perf_counter() - start
    if val is not None:
        metrics.update({f"val_{k}_local": v for k, v in _evaluate(plan, model, *val, batch_size).items()})
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params, extra_out, new_state = algorithm.finish(start_params, _float_params(model), params, steps)
    params = local.client_dp(params, received, targs)
    metrics["train_loss"] = loss_sum / max(seen, 1)
    for name in args.report_norms:  # e.g. the input layer, as in the paper's Figure 3
        if name in params:
            metrics[f"norm:{name}"] = float(params[name].double().norm())
    return {"params": to_arrays(params), "n_samples": len(x_train), "metrics": metrics,
            "timings": {"train_s": train_s}, "steps": steps, "extra": to_arrays(extra_out),
            "local_state": {k: to_arrays(v) for k, v in new_state.items()}}


def _split(data: datasets.LoadedData, args: local.TrainingArgs):
    """(x_train, y_train, (x_val, y_val) or None): standardized, the validation split held out."""
    x_all, y_all = data.x, data.y
    if args.standardize:
        x_all = local.standardize(x_all, args.standardize["mean"], args.standardize["std"])
    train_idx, val_idx = local.validation_split(len(x_all), args.val_fraction, args.seed)
    if not len(val_idx):  # no split: no copy of the dataset
        return x_all, y_all, None
    pick = (lambda idx: y_all[idx] if y_all is not None else None)  # noqa: E731
    return x_all[train_idx], pick(train_idx), (x_all[val_idx], pick(val_idx))


def _check_algorithm(targs: dict[str, Any], plan_cls) -> None:
    """LocalError if the plan or DP-SGD cannot run the job's local algorithm."""
    algorithm = local.algorithm_of(targs)
    supported = getattr(plan_cls, "supported_algorithms", local.LOCAL_ALGORITHMS)
    if algorithm not in supported:
        raise local.LocalError(f"plan {plan_cls.__name__} does not support the {algorithm!r} local algorithm")
    if local.dp_mode(targs) == "sample" and algorithm != "sgd":
        raise local.LocalError(f"DP-SGD runs the plain sgd local algorithm only, not {algorithm!r}")


def _train_plain(plan, model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor | None,
                 args: local.TrainingArgs, seed: int, algorithm: local.SGD) -> tuple[float, int, int]:
    """Local epochs of shuffled minibatches (the job's seed fixes the order); (loss sum, seen, steps)."""
    optimizer = plan.optimizer(model)
    max_batches, batch_size = args.max_batches, args.batch_size
    gen = torch.Generator().manual_seed(seed)
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(args.epochs):
        loss_sum, seen = 0.0, 0
        for index in _batches(len(x_train), batch_size, gen):
            x = x_train[index]
            y = y_train[index] if y_train is not None else None
            optimizer.zero_grad(set_to_none=True)
            loss = plan.training_step(model, x, y)
            penalty = algorithm.penalty(model)
            (loss + penalty if penalty is not None else loss).backward()
            algorithm.correct_(model)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            steps += 1
            if max_batches is not None and steps >= max_batches:
                break
    return loss_sum, seen, steps


def urandom_generator() -> torch.Generator:
    """A torch generator seeded from the OS CSPRNG: nothing in the job (its seed, its round) fixes it."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def _dp_sgd_parts(plan, model: torch.nn.Module, dataset, args: local.TrainingArgs):
    """Opacus' per-sample gradients, Poisson-sampled loader and noising optimizer for one round;
    LocalError (with Opacus' reason) for a model it cannot train."""
    try:
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator
    except ImportError as exc:
        raise local.LocalError("this node cannot run DP-SGD: opacus is not installed") from exc

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise local.LocalError(f"Opacus cannot train this model under DP-SGD: {errors[0]}")
    dp = args.dp or {}
    q, steps = local.dp_sgd_schedule(len(dataset), args.model_dump())
    loader = DPDataLoader(dataset, sample_rate=q, generator=urandom_generator())
    loader.batch_sampler.steps = math.ceil(1 / q)  # the steps the accountant priced (Opacus: int(1/q))
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(plan.optimizer(wrapped), noise_multiplier=float(dp["noise_multiplier"]),
                            max_grad_norm=float(dp["max_grad_norm"]), expected_batch_size=max(1, round(q * len(dataset))),
                            generator=urandom_generator())
    return wrapped, loader, optimizer, steps


def _train_dp_sgd(plan, model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor | None,
                  args: local.TrainingArgs) -> tuple[float, int, int]:
    """Sample-level DP-SGD (Abadi et al. 2016) with Opacus: Poisson batches at q = batch_size / n,
    per-sample clipping, Gaussian noise; exactly `dp_sgd_schedule` steps. Sampling and noise
    both come from generators seeded by os.urandom, never by the job."""
    dataset = TensorDataset(x_train) if y_train is None else TensorDataset(x_train, y_train)
    wrapped, loader, optimizer, total = _dp_sgd_parts(plan, model, dataset, args)
    loss_sum, seen, steps = 0.0, 0, 0
    try:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad: expected
        while steps < total:
            for batch in loader:
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
                optimizer.zero_grad(set_to_none=True)
                loss = plan.training_step(wrapped, x, y)
                loss.backward()
                optimizer.step()  # an empty Poisson batch is a step too: noise only
                if len(x):
                    loss_sum += float(loss.detach()) * len(x)
                    seen += len(x)
                steps += 1
                if steps >= total:
                    break
    finally:
        wrapped.remove_hooks()
    return loss_sum, seen, steps


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


def warm_template() -> None:
    """`warm_up` in the template, on one torch thread (no OpenMP pool is started, so nothing is
    left half-alive in a fork): its kernels and allocator pages are shared by every fork, and
    a training process's own `warm_up` costs ~4 ms of CPU instead of ~9."""
    torch.set_num_threads(1)
    warm_up()


def warm_up() -> None:
    """Pay torch's remaining one-time costs (kernels, allocator) before the first round.

    In a training process, after the template's `warm_template`, this takes ~4.6 ms of CPU; it
    runs after `confine`, since it may start threads.
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


def _statistics_answer(task: dict[str, Any], cache: _Cache) -> dict[str, Any]:
    """Sufficient statistics of the job's dataset, read here in the confined child, never in the
    node; a refusal (too few rows, too many features) is an answer too."""
    from node.policy import StatisticsPolicy
    from node.statistics import StatisticsRefused, sufficient_statistics

    try:
        data, _ = cache.dataset(task["dataset"])
        stats = sufficient_statistics(data, min_rows=int(task["min_rows"]), bins=int(task.get("bins") or 0),
                                      ranges=task.get("ranges"), policy=StatisticsPolicy(**task["policy"]))
        return {"ok": True, **stats}
    except StatisticsRefused as exc:
        return {"ok": False, "refused": str(exc)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _await_confinement(sock: socket.socket) -> dict[str, Any] | None:
    """A spare's first frame from the node: the policy of the job it will serve (None: stop)."""
    try:
        frame = recv_frame(sock, MAX_TASK_BYTES)
    except (OSError, RuntimeError):  # the node (or its template) closed the pipe
        return None
    if isinstance(frame, dict) and frame.get("op") == "confine" and isinstance(frame.get("policy"), dict):
        return frame["policy"]
    return None


def serve(sock: socket.socket, threads: int, policy: dict[str, Any] | None) -> None:
    """A job's training process, just forked from the template (`node.zygote`): confine to the
    job's `policy` first, then warm up, then one round in, one answer out until the node says stop.
    A spare (`policy` None) is forked before any job: it waits, unconfined but holding nothing
    the template did not, for the node to send the job's policy, and confines itself then.

    The template imported torch and `preimport`ed before any job was known; nothing that starts
    threads runs before `confine`, because Landlock binds only the calling thread and those it
    starts (after a fork this thread is the only one).
    """
    if policy is None:  # a spare, forked before its job was known: the node names the job's confinement
        policy = _await_confinement(sock)
        if policy is None:
            return
    applied = confine(SandboxPolicy(**{**policy, "read_paths": tuple(policy["read_paths"])}))
    sched.ask_long_slice()  # batch work: whole rounds in few slices, not cache-cold pieces
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
        send_frame(sock, _statistics_answer(task, cache) if task.get("op") == "statistics" else _answer(task, cache))
