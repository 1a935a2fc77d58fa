"""A round's training set-up without torch's per-call overheads: the same results, cheaper."""

from __future__ import annotations

import traceback

import pytest
import torch

from common.messages import PlanRef
from common.training.loader import load_plan_class
from node import worker
from node.simulation import synthetic_data


def _task(params) -> dict:
    plan = PlanRef(zoo="logreg")
    return {"job": "j", "round": 2, "plan": plan.model_dump(), "model_args": {"in_features": 10, "n_classes": 2},
            "training_args": {"epochs": 2, "lr": 0.1, "batch_size": 8, "seed": 5}, "params": params, "extra": {},
            "local_state": {}}


def test_a_round_trains_bit_identical_to_seeding_with_torch_manual_seed(monkeypatch):
    plan_cls = load_plan_class(PlanRef(zoo="logreg"))
    params = plan_cls({"in_features": 10, "n_classes": 2}, {}).build_model().state_dict()
    data = synthetic_data(3, 40)
    ours = worker.train(_task(dict(params)), data, plan_cls)
    monkeypatch.setattr(worker, "seed_torch", torch.manual_seed)
    theirs = worker.train(_task(dict(params)), data, plan_cls)
    assert ours["params"].keys() == theirs["params"].keys()
    for key in ours["params"]:
        assert ours["params"][key].tobytes() == theirs["params"][key].tobytes(), key
    assert ours["metrics"]["train_loss"] == theirs["metrics"]["train_loss"]


def test_seeding_formats_no_stack_where_there_is_no_accelerator(monkeypatch):
    """torch.manual_seed formats the caller's stack for each accelerator it queues a lazy seed
    for (0.1-0.2 ms a call: a third of a tiny model's round, 10,000 a round in the fleet)."""
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is seeded through torch.manual_seed")

    def no_stacks(*a, **k):
        raise AssertionError("a stack was formatted")

    monkeypatch.setattr(traceback, "format_stack", no_stacks)
    with pytest.raises(AssertionError, match="a stack was formatted"):
        torch.manual_seed(1)  # what the round paid before
    worker.seed_torch(7)
    assert torch.initial_seed() == 7


def test_no_validation_split_gives_the_indices_the_permutation_gave():
    from common.training.local import validation_split

    for n in (1, 7, 32):
        train, val = validation_split(n, 0.0, seed=3)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + 3))
        assert torch.equal(train, order.sort().values) and train.dtype == order.dtype
        assert len(val) == 0 and val.dtype == order.dtype
