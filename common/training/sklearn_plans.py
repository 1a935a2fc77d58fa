"""scikit-learn linear models as training plans: SGDClassifier, SGDRegressor, Perceptron.

The model state is a torch module holding `coef` (outputs, features), `intercept` (outputs,)
and `t` (sklearn's step counter, which drives the learning-rate schedule) as tensors, so the
researcher's initial model, FedAvg and `Experiment.model()` work as for any torch plan. On the
node, `fit_round` loads them into a fresh estimator, runs `partial_fit` for `epochs` passes
and hands the new coefficients back: no torch training loop is involved.

model_args: n_features, n_classes (classifiers; 2 gives sklearn's one-vs-rest single row),
and any estimator keyword (loss, alpha, penalty, learning_rate, eta0, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from common.training.plan import TrainingPlan

Params = dict[str, torch.Tensor]


class LinearState(nn.Module):
    """The linear model's state as tensors; forward gives sklearn's decision function."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.coef = nn.Parameter(torch.zeros(n_outputs, n_features, dtype=torch.float64))
        self.intercept = nn.Parameter(torch.zeros(n_outputs, dtype=torch.float64))
        self.register_buffer("t", torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x.flatten(1).double() @ self.coef.T + self.intercept
        return scores


class SklearnPlan(TrainingPlan):
    """Base of the scikit-learn plans: trains with `fit_round`, not `training_step`."""

    supported_algorithms = ("sgd",)
    estimator_keys = ("loss", "penalty", "alpha", "l1_ratio", "learning_rate", "eta0", "power_t", "fit_intercept")

    def estimator(self, seed: int) -> Any:
        raise NotImplementedError

    def n_outputs(self) -> int:
        return 1

    def build_model(self) -> nn.Module:
        return LinearState(int(self.model_args.get("n_features", 30)), self.n_outputs())

    def estimator_args(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_args.items() if k in self.estimator_keys}

    def load(self, est: Any, params: Params, n_features: int) -> None:
        est.coef_ = params["coef"].double().numpy().copy()
        est.intercept_ = params["intercept"].double().numpy().copy()
        est.t_ = float(params["t"])
        est.n_features_in_ = n_features

    def state(self, est: Any) -> Params:
        coef = np.asarray(est.coef_, dtype=np.float64).reshape(self.n_outputs(), -1)
        return {"coef": torch.from_numpy(coef.copy()),
                "intercept": torch.from_numpy(np.asarray(est.intercept_, dtype=np.float64).reshape(-1).copy()),
                "t": torch.tensor(float(est.t_), dtype=torch.float64)}

    def targets(self, y: torch.Tensor) -> np.ndarray:
        return y.numpy()

    def fit_round(self, params: Params, x: torch.Tensor, y: torch.Tensor | None, seed: int) -> tuple[Params, dict[str, float]]:
        """`epochs` passes of partial_fit from the global state; the new state and train metrics."""
        if y is None:
            raise ValueError(f"{type(self).__name__} needs labelled data (a target)")
        xs = x.flatten(1).double().numpy()
        ys = self.targets(y)
        est = self.estimator(seed)
        self.load(est, params, xs.shape[1])
        for _ in range(int(self.training_args.get("epochs", 1))):
            self.partial_fit(est, xs, ys)
        return self.state(est), self.metrics(est, xs, ys)

    def partial_fit(self, est: Any, x: np.ndarray, y: np.ndarray) -> None:
        est.partial_fit(x, y)

    def metrics(self, est: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        raise NotImplementedError


class _ClassifierPlan(SklearnPlan):
    def n_classes(self) -> int:
        return int(self.model_args.get("n_classes", 2))

    def n_outputs(self) -> int:
        return 1 if self.n_classes() == 2 else self.n_classes()

    def targets(self, y: torch.Tensor) -> np.ndarray:
        return y.long().numpy()

    def load(self, est: Any, params: Params, n_features: int) -> None:
        super().load(est, params, n_features)
        est.classes_ = np.arange(self.n_classes())

    def partial_fit(self, est: Any, x: np.ndarray, y: np.ndarray) -> None:
        est.partial_fit(x, y, classes=np.arange(self.n_classes()))

    def metrics(self, est: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        from sklearn.metrics import hinge_loss, log_loss

        labels = np.arange(self.n_classes())
        if getattr(est, "loss", "") == "log_loss":
            loss = log_loss(y, est.predict_proba(x), labels=labels)
        else:
            loss = hinge_loss(y, est.decision_function(x), labels=labels)
        return {"train_loss": float(loss), "train_accuracy": float(est.score(x, y))}

    def validation_step(self, model, x, y):
        scores = model(x)
        pred = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
        return {"accuracy": float((pred == y.long()).sum())}


class SGDClassifierPlan(_ClassifierPlan):
    """sklearn.linear_model.SGDClassifier (hinge loss by default: a linear SVM)."""

    def estimator(self, seed: int) -> Any:
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier(random_state=seed, **self.estimator_args())


class PerceptronPlan(_ClassifierPlan):
    """sklearn.linear_model.Perceptron."""

    estimator_keys = ("penalty", "alpha", "l1_ratio", "eta0", "fit_intercept")

    def estimator(self, seed: int) -> Any:
        from sklearn.linear_model import Perceptron

        return Perceptron(random_state=seed, **self.estimator_args())


class SGDRegressorPlan(SklearnPlan):
    """sklearn.linear_model.SGDRegressor (squared error by default)."""

    task = "regression"
    estimator_keys = (*SklearnPlan.estimator_keys, "epsilon")

    def estimator(self, seed: int) -> Any:
        from sklearn.linear_model import SGDRegressor

        return SGDRegressor(random_state=seed, **self.estimator_args())

    def load(self, est: Any, params: Params, n_features: int) -> None:
        super().load(est, params, n_features)
        est.coef_ = est.coef_.reshape(-1)

    def targets(self, y: torch.Tensor) -> np.ndarray:
        return y.double().numpy().reshape(-1)

    def metrics(self, est: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        residual = est.predict(x) - y
        return {"train_loss": float(np.mean(residual**2)), "train_r2": float(est.score(x, y))}

    def validation_step(self, model, x, y):
        return {"loss": float(((model(x)[:, 0] - y.double()) ** 2).sum())}


SKLEARN_PLANS: dict[str, type[TrainingPlan]] = {
    "sgd_classifier": SGDClassifierPlan,
    "sgd_regressor": SGDRegressorPlan,
    "perceptron": PerceptronPlan,
}
