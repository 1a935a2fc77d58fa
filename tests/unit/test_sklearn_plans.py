"""The scikit-learn plans: a round of partial_fit from a given state, the state as tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.training.local import LocalError
from common.training.zoo import ZOO
from node.plan_rounds import fit_round, has_own_loop
from tests.conftest import require_module


def _round(plan_name, margs, x, y, params=None, **targs):
    plan = ZOO[plan_name]
    params = params or {k: v.detach().clone() for k, v in plan(margs, targs).build_model().state_dict().items()}
    return fit_round({"round": 1, "training_args": {"seed": 0, **targs}, "model_args": margs}, x, y, plan, params)


def test_classifier_state_round_trips_and_matches_sklearn():
    sk = require_module("sklearn", "scikit-learn")
    x, y = sk.datasets.make_classification(200, 5, n_classes=3, n_informative=3, random_state=0)
    x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    out = _round("sgd_classifier", {"n_features": 5, "n_classes": 3}, x, y, epochs=3)
    assert out["params"]["coef"].shape == (3, 5) and out["params"]["intercept"].shape == (3,)
    assert float(out["params"]["t"]) == 1 + 3 * 200  # sklearn's step counter goes on across rounds
    assert out["metrics"]["train_accuracy"] > 0.6
    # the next round starts where this one stopped: the same as sklearn's own partial_fit
    est = sk.linear_model.SGDClassifier(random_state=1)  # the round seed: seed * 1_000_003 + round
    for _ in range(3):
        est.partial_fit(x.double().numpy(), y.numpy(), classes=np.arange(3))
    np.testing.assert_allclose(out["params"]["coef"].numpy(), est.coef_, rtol=1e-6)
    assert has_own_loop(ZOO["sgd_classifier"]) and not has_own_loop(ZOO["mlp"])


def test_regressor_and_perceptron():
    sk = require_module("sklearn", "scikit-learn")
    x, y = sk.datasets.make_regression(200, 4, noise=0.1, random_state=0)
    x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y / y.std())
    first = _round("sgd_regressor", {"n_features": 4}, x, y, epochs=2)
    second = _round("sgd_regressor", {"n_features": 4}, x, y, params=first["params"], epochs=2)
    assert second["metrics"]["train_loss"] < 0.05 and second["metrics"]["train_r2"] > 0.95
    xb, yb = sk.datasets.make_classification(200, 4, random_state=0)
    out = _round("perceptron", {"n_features": 4, "n_classes": 2}, torch.from_numpy(xb), torch.from_numpy(yb), val_fraction=0.2)
    assert out["params"]["coef"].shape == (1, 4) and out["metrics"]["val_accuracy_local"] > 0.7


def test_dp_is_refused():
    with pytest.raises(LocalError, match="client-level DP"):
        _round("sgd_classifier", {"n_features": 2}, torch.zeros(4, 2), torch.zeros(4), dp={"clip": 1, "sigma": 1})
