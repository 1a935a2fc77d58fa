"""Sample-level DP-SGD (Opacus) as a torch plan's option (issue 19): the worker runs it, the
node's accountant prices it exactly as Opacus would, and the site's policy applies to it."""

from __future__ import annotations

import warnings

import pytest
import torch

from common.messages import PlanRef
from common.training.local import LocalError, dp_sgd_schedule, train_rows
from common.training.plan import TrainingPlan
from common.training.zoo import ZOO
from node.accountant import ORDERS, job_epsilon
from node.datasets import LoadedData
from node.policy import PrivacyPolicy, job_ask, policy_refusal
from node.worker import train
from tests.conftest import require_module

SAMPLE = {"mode": "sample", "noise_multiplier": 1.1, "max_grad_norm": 1.0}
TARGS = {"batch_size": 32, "epochs": 2, "lr": 0.1, "dp": SAMPLE}


def _opacus_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountants = require_module("opacus.accountants", "opacus (pip install -e '.[dev]')")
    reference = accountants.RDPAccountant()
    reference.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference.get_epsilon(delta, alphas=list(ORDERS))


def test_the_schedule_is_poisson_rate_and_ceil_steps():
    assert dp_sgd_schedule(600, {"batch_size": 32, "epochs": 2}) == (32 / 600, 2 * 19)
    held_out = {"batch_size": 32, "epochs": 2, "val_fraction": 0.2}
    assert dp_sgd_schedule(train_rows(600, held_out), held_out) == (32 / 480, 2 * 15)
    assert dp_sgd_schedule(600, {"batch_size": 32, "epochs": 3, "max_batches": 5}) == (32 / 600, 5)
    assert dp_sgd_schedule(10, {"batch_size": 32}) == (1.0, 1)


@pytest.mark.parametrize("rounds, targs", [(5, TARGS), (3, {**TARGS, "epochs": 1, "batch_size": 64}),
                                           (10, {**TARGS, "dp": {**SAMPLE, "noise_multiplier": 0.8}})])
def test_the_jobs_epsilon_equals_opacus_rdp_accountant(rounds, targs):
    ask = job_ask(rounds, 1, targs)
    q, per_round = dp_sgd_schedule(600, targs)
    ours = job_epsilon(ask, 600, 1e-5)
    assert ours == pytest.approx(_opacus_epsilon(q, ask.dp_sigma, per_round * rounds, 1e-5), rel=1e-9)


def test_sample_level_dp_spends_far_less_than_client_level_for_the_same_sigma():
    sample = job_epsilon(job_ask(5, 1, TARGS), 600, 1e-5)
    client = job_epsilon(job_ask(5, 1, {**TARGS, "dp": {"clip": 1.0, "sigma": 1.1}}), 600, 1e-5)
    assert sample == pytest.approx(4.704, abs=1e-3) and client == pytest.approx(11.0, abs=1e-3)  # q 0.053, 190 steps


@pytest.mark.parametrize("dp, policy, broken", [
    ({**SAMPLE, "noise_multiplier": 0.2}, {}, "DP sigma 0.2 is below the minimum 0.5"),
    ({**SAMPLE, "max_grad_norm": 50.0}, {}, "DP clip 50.0 is outside"),
    ({**SAMPLE, "mode": "secret"}, {}, "training_args.dp mode"),
    (SAMPLE, {"dp_required": True, "epsilon_budget": 3.0}, None),
])
def test_the_policy_applies_to_dp_sgd(dp, policy, broken):
    try:
        refusal = policy_refusal(PrivacyPolicy(**policy), job_ask(5, 1, {**TARGS, "dp": dp}), dataset_rows=600)
    except ValueError as exc:
        refusal = f"privacy policy: {exc}"
    assert (refusal is None) if broken is None else (broken in refusal)


def test_dp_sgd_runs_plain_sgd_only():
    refusal = policy_refusal(PrivacyPolicy(), job_ask(5, 1, {**TARGS, "algorithm": "fedprox"}), dataset_rows=600)
    assert refusal is not None and "DP-SGD runs the plain sgd local algorithm" in refusal


def _task(targs: dict, seed_params: int = 0) -> tuple[dict, LoadedData]:
    torch.manual_seed(seed_params)
    x = torch.randn(120, 4)
    y = (x[:, 0] > 0).long()
    plan = ZOO["mlp"]({"in_features": 4, "hidden": [8], "n_classes": 2}, targs)
    params = {k: v.detach().clone().numpy() for k, v in plan.build_model().state_dict().items()}
    task = {"job": "j", "round": 1, "training_args": targs, "params": params,
            "model_args": {"in_features": 4, "hidden": [8], "n_classes": 2}, "plan": PlanRef(zoo="mlp").model_dump()}
    return task, LoadedData(x, y, {})


def test_a_dp_sgd_round_runs_in_the_worker_and_changes_the_model():
    targs = {"batch_size": 16, "epochs": 2, "lr": 0.5, "seed": 3, "dp": SAMPLE}
    task, data = _task(targs)
    first = train(task, data, ZOO["mlp"])
    assert first["steps"] == dp_sgd_schedule(120, targs)[1] == 16
    changed = [k for k in task["params"] if not torch.equal(torch.as_tensor(first["params"][k]), torch.as_tensor(task["params"][k]))]
    assert sorted(changed) == sorted(task["params"])
    again = train(task, data, ZOO["mlp"])  # same job, same seed: the noise and the sample are not the job's to fix
    assert not torch.equal(torch.as_tensor(first["params"]["net.0.weight"]), torch.as_tensor(again["params"]["net.0.weight"]))


class _BatchNormPlan(TrainingPlan):
    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))

    def training_step(self, model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y)


def test_a_model_opacus_cannot_train_is_refused_with_the_reason():
    targs = {"batch_size": 16, "epochs": 1, "dp": SAMPLE}
    task, data = _task(targs)
    task["params"] = {k: v.numpy() for k, v in _BatchNormPlan().build_model().state_dict().items()}
    with pytest.raises(LocalError, match="Opacus cannot train this model"):
        train(task, data, _BatchNormPlan)


def test_a_dp_sgd_round_runs_in_the_confined_training_process(tmp_path):
    """Opacus imports and trains inside the sandbox (Landlock: Python and the dataset only)."""
    from node.sandbox import SandboxPolicy
    from node.trainer import Trainer
    from tests.security.conftest import plan_task, write_npz

    trainer = Trainer(threads=1, policy=SandboxPolicy(landlock=True))
    try:
        task = plan_task("dp-sgd", write_npz(tmp_path / "d.npz", n=64), PlanRef(zoo="mlp"), batch_size=16, epochs=1,
                         dp=SAMPLE)
        result = trainer.run(task, timeout_s=120)
        assert result["steps"] == 4 and result["n_samples"] == 64
        assert not torch.equal(result["params"]["net.0.weight"], task["params"]["net.0.weight"])
    finally:
        trainer.stop()
