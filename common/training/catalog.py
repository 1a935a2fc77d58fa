"""What a node needs to know about plans and local algorithms before it trains anything, without
importing torch: the local algorithms, the zoo's plan names and the algorithms each supports.

The node process decides on a job (accept, decline, park) from these; only its training
processes import torch and the plans themselves (`common.training.zoo`, checked against this
catalog by tests/unit/test_torch_free_node.py).
"""

from __future__ import annotations

import math
from typing import Any

from common.training.args import (  # noqa: F401 - one source: the typed training args (torch-free too)
    ALGORITHM_OF_RULE,
    LOCAL_ALGORITHMS,
    LocalError,
    TrainingArgs,
    algorithm_of,
)

SCAFFOLD_PREFIX = "c/"

_TORCH_LOOP = LOCAL_ALGORITHMS
_OWN_LOOP = ("sgd",)  # scikit-learn plans (`fit_round`)
# zoo plan name -> the local algorithms it runs (the classes' `supported_algorithms`)
ZOO_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "mlp": _TORCH_LOOP, "cnn": _TORCH_LOOP, "logreg": _TORCH_LOOP, "vae": _TORCH_LOOP,
    "linear_vae": _TORCH_LOOP, "sgd_classifier": _OWN_LOOP, "sgd_regressor": _OWN_LOOP,
    "perceptron": _OWN_LOOP, "cnn3d": _TORCH_LOOP, "monai_classifier": _TORCH_LOOP,
}


DP_MODES = ("client", "sample")


def dp_mode(training_args: dict[str, Any]) -> str | None:
    """None (no DP), "client" (`{clip, sigma}`, the default) or "sample" (DP-SGD)."""
    dp = TrainingArgs.of(training_args).dp or None
    if dp is None:
        return None
    mode = str(dp.get("mode", "client"))
    if mode not in DP_MODES:
        raise LocalError(f"training_args.dp mode {mode!r} is not one of {', '.join(DP_MODES)}")
    return mode


def train_rows(n: int, training_args: dict[str, Any]) -> int:
    """How many of `n` rows are trained on: the rest is the validation split (`validation_split`)."""
    return n - int(round(n * TrainingArgs.of(training_args).val_fraction))


def dp_sgd_schedule(n_train: int, training_args: dict[str, Any]) -> tuple[float, int]:
    """(Poisson sample rate q, DP-SGD steps a round) over `n_train` rows: q = batch_size / n,
    ceil(1/q) steps an epoch, at most `max_batches`. The worker runs exactly these steps and
    the node's accountant prices exactly these, so both sides call this one function."""
    args = TrainingArgs.of(training_args)
    q = min(1.0, args.batch_size / max(1, n_train))
    steps = args.epochs * math.ceil(1 / q)
    return q, steps if args.max_batches is None else min(steps, args.max_batches)
