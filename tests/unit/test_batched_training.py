"""The simulated fleet's batched trainer (node/batched.py) against the real one, site by site:
each site's update must be what `node.worker.train` computes for it, within float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.training.zoo import ZOO
from node.batched import train_many
from node.datasets import LoadedData
from node.simulation import synthetic_data
from node.worker import train

TOL = 1e-6  # absolute, on parameters and losses: batched kernels sum a batch in another order


def _task(plan: str, model_args: dict, targs: dict, params: dict, round_: int) -> dict:
    return {"job": "j", "round": round_, "plan": {"zoo": plan}, "model_args": model_args, "training_args": targs,
            "params": params, "extra": {}, "local_state": {}}


def _initial(plan: str, model_args: dict) -> dict:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in ZOO[plan](model_args, {}).build_model().state_dict().items()}


def _mean(results: list[dict]) -> dict:
    """FedAvg of the sites' updates: the next round's model (so later rounds start elsewhere)."""
    total = sum(r["n_samples"] for r in results)
    return {k: sum(torch.from_numpy(r["params"][k]) * r["n_samples"] for r in results) / total
            for k in results[0]["params"]}


def _assert_same(batched: list[dict], serial: list[dict]) -> None:
    assert len(batched) == len(serial)
    for b, s in zip(batched, serial, strict=True):
        assert b["n_samples"] == s["n_samples"] and b["steps"] == s["steps"]
        assert sorted(b["params"]) == sorted(s["params"]) and sorted(b["metrics"]) == sorted(s["metrics"])
        for k in s["params"]:
            assert b["params"][k].dtype == s["params"][k].dtype
            np.testing.assert_allclose(b["params"][k], s["params"][k], rtol=0, atol=TOL)
        for k in s["metrics"]:
            assert b["metrics"][k] == pytest.approx(s["metrics"][k], abs=TOL)
        assert b["extra"] == {} and b["local_state"] == {}


@pytest.mark.parametrize(("plan", "model_args", "targs"), [
    ("logreg", {"in_features": 10, "n_classes": 2}, {"epochs": 1, "lr": 0.1, "batch_size": 32}),
    ("logreg", {"in_features": 10, "n_classes": 3}, {"epochs": 2, "lr": 0.2, "batch_size": 16, "seed": 5}),
    ("mlp", {"in_features": 10, "hidden": [8], "n_classes": 2},
     {"epochs": 3, "lr": 0.05, "batch_size": 8, "momentum": 0.9, "max_batches": 5, "seed": 3,
      "report_norms": ["net.0.weight"]}),
])
def test_each_site_gets_what_serial_training_gives_it_round_after_round(plan, model_args, targs):
    classes = model_args["n_classes"]
    # different sample counts (batched per count), data seeds and class balances per site
    datas = [synthetic_data(i, n, classes=classes) for i, n in enumerate([32, 20, 32, 45, 20, 7, 32])]
    params = _initial(plan, model_args)
    for round_ in (1, 2, 3):
        task = _task(plan, model_args, targs, params, round_)
        batched = train_many(task, datas, ZOO[plan])
        assert batched is not None, "this job is one the batched trainer must take"
        serial = [train(task, d, ZOO[plan]) for d in datas]
        _assert_same(batched, serial)
        params = _mean(serial)


def test_standardized_features_batch_too():
    model_args = {"in_features": 10, "n_classes": 2}
    targs = {"epochs": 1, "lr": 0.1, "batch_size": 16, "standardize": {"mean": [0.5] * 10, "std": [2.0] * 10}}
    datas = [synthetic_data(i, 24) for i in range(4)]
    task = _task("logreg", model_args, targs, _initial("logreg", model_args), 1)
    _assert_same(train_many(task, datas, ZOO["logreg"]) or [], [train(task, d, ZOO["logreg"]) for d in datas])


@pytest.mark.parametrize("targs", [
    {"algorithm": "fedprox"},  # a penalty in the loss: serial
    {"algorithm": "scaffold"},
    {"optimizer": "adam"},
    {"val_fraction": 0.25},  # validation metrics: serial
    {"dp": {"clip": 1.0, "sigma": 0.5}},  # client-level DP
    {"algorithm": "no such algorithm"},  # the serial path refuses it in its own words
])
def test_what_it_cannot_reproduce_exactly_is_left_to_serial_training(targs):
    model_args = {"in_features": 10, "n_classes": 2}
    task = _task("logreg", model_args, {"epochs": 1, "lr": 0.1, "batch_size": 16, **targs},
                 _initial("logreg", model_args), 1)
    assert train_many(task, [synthetic_data(i, 16) for i in range(3)], ZOO["logreg"]) is None


def test_a_step_drawing_random_numbers_is_left_to_serial_training():
    model_args = {"in_features": 10, "hidden": [6], "latent": 2, "linear": True}
    data = [LoadedData(torch.rand(16, 10), None, {"n_samples": 16, "shape": [10]}) for _ in range(3)]
    task = _task("linear_vae", model_args, {"epochs": 1, "lr": 0.01, "batch_size": 8}, _initial("linear_vae", model_args), 1)
    assert train_many(task, data, ZOO["linear_vae"]) is None  # the VAE samples its latent: vmap refuses it
