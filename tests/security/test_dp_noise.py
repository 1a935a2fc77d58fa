"""Client-level DP against a researcher who reads the job spec (issue 19).

The attack: a job with batch_size=1 and one step makes a node's update one patient's gradient;
for a linear first layer, the weight change of a class row divided by its bias change is the
input record itself. DP noise should hide it. On the old code the noise came from
`torch.Generator().manual_seed(seed * 1_000_003 + round + 7)`, the seed being the job's
`training_args.seed`: the researcher regenerated the noise, subtracted it, and read the record
back exactly (relative error ~1e-7). Now the noise comes from the OS CSPRNG.
"""

from __future__ import annotations

import numpy as np
import torch

from common.training.zoo import ZOO
from node.datasets import LoadedData
from node.worker import to_arrays, to_tensors, train

FEATURES = 6


def _one_record_update(record: torch.Tensor, seed: int, dp: dict | None) -> tuple[dict, dict]:
    plan = ZOO["logreg"]
    targs = {"batch_size": 1, "max_batches": 1, "epochs": 1, "lr": 0.5, "seed": seed, "optimizer": "sgd"}
    if dp:
        targs["dp"] = dp
    model_args = {"in_features": FEATURES, "n_classes": 2}
    torch.manual_seed(0)
    initial = {k: v.detach().clone() for k, v in plan(model_args, targs).build_model().state_dict().items()}
    task = {"job": "j", "round": 1, "model_args": model_args, "training_args": targs, "params": to_arrays(initial)}
    data = LoadedData(record.reshape(1, FEATURES), torch.tensor([1.0]), {})
    out = train(task, data, plan)
    return initial, to_tensors(out["params"])


def _read_back(initial: dict, params: dict) -> torch.Tensor:
    w = [k for k in params if k.endswith("weight")][0]
    b = [k for k in params if k.endswith("bias")][0]
    dw, db = (params[w] - initial[w]).double(), (params[b] - initial[b]).double()
    return dw[0] / db[0]


def _regenerate_and_subtract(initial: dict, params: dict, seed: int, dp: dict) -> dict:
    """The attacker's step on the old code: the same generator, the same draws, subtracted."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 1 + 7)
    out = {}
    for k, v in params.items():
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float64) * (dp["sigma"] * dp["clip"])
        out[k] = (v.double() - noise).to(v.dtype) if v.is_floating_point() else v
    return out


def test_without_dp_one_record_is_read_back_from_its_update():
    """The leak itself (why the site's policy must forbid such jobs; see docs/privacy.md)."""
    record = torch.tensor([0.3, -1.2, 2.5, 0.7, -0.4, 1.9])
    initial, params = _one_record_update(record, seed=5, dp=None)
    assert torch.allclose(_read_back(initial, params).float(), record, rtol=1e-4, atol=1e-4)


def test_dp_noise_cannot_be_regenerated_from_the_job_spec():
    record = torch.tensor([0.3, -1.2, 2.5, 0.7, -0.4, 1.9])
    dp = {"clip": 1.0, "sigma": 1.0}
    initial, params = _one_record_update(record, seed=5, dp=dp)
    cleaned = _regenerate_and_subtract(initial, params, seed=5, dp=dp)
    error = float((_read_back(initial, cleaned).float() - record).norm() / record.norm())
    assert error > 0.5, f"the record was read back with relative error {error:.2e}: the noise was regenerated"


def test_the_same_task_twice_gets_different_noise():
    record = torch.tensor([0.3, -1.2, 2.5, 0.7, -0.4, 1.9])
    dp = {"clip": 1.0, "sigma": 1.0}
    _, first = _one_record_update(record, seed=5, dp=dp)
    _, second = _one_record_update(record, seed=5, dp=dp)
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert np.isfinite(np.concatenate([v.numpy().ravel() for v in first.values()])).all()
