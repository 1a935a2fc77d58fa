"""The training args every party reads, typed and validated once (issue 16).

A job's `training_args` is a free mapping: a plan may read keys of its own (`augment`,
`modalities`, `encoding`, ...). The keys the framework itself reads are typed here, with their
defaults, and validated at submit (researcher.Experiment), on the node (before it accepts) and on
the aggregator (before its first round); code reads `TrainingArgs.of(args).epochs` instead of
`args.get("epochs", 1)`. Compression (`CompressionSpec`) and DP (`node.policy`) keep their own
validation and their own refusal texts. No torch here: every role imports it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LOCAL_ALGORITHMS = ("sgd", "fedprox", "scaffold", "admm")
# The one rule-to-local-algorithm table: the local algorithm each built-in rule needs (the rule
# classes read their `local_algorithm` from it; third-party rules declare theirs; a job names it
# in training_args["algorithm"], which Experiment fills in from this table).
ALGORITHM_OF_RULE = {"fedprox": "fedprox", "scaffold": "scaffold", "admm": "admm"}


class LocalError(ValueError):
    """The training args ask for something the node cannot do; the message says why."""


class TrainingArgsError(LocalError):
    """The training args are not what the framework can read; the message says which one."""


class TrainingArgs(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    algorithm: str = "sgd"  # one of LOCAL_ALGORITHMS (checked by `algorithm_of`, with its own text)
    epochs: int = Field(default=1, ge=0)
    batch_size: int = Field(default=64, ge=1)
    max_batches: int | None = None
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    mu: float = 0.01  # FedProx's proximal strength
    rho: float = 0.1  # ADMM's penalty
    seed: int = 0
    val_fraction: float = Field(default=0.0, ge=0, lt=1)
    standardize: dict[str, Any] | None = None  # {"mean": [...], "std": [...]}
    dp: dict[str, Any] | None = None  # client ({clip, sigma}) or sample (DP-SGD); node.policy reads it
    compression: Any = None  # CompressionSpec.of reads it
    report_norms: list[str] = []  # parameter names whose norm the aggregator reports each round

    @classmethod
    def of(cls, training_args: dict[str, Any]) -> TrainingArgs:
        """The typed view of a job's training args; TrainingArgsError names the first bad key."""
        try:
            return cls.model_validate(training_args)
        except ValueError as exc:
            errors = getattr(exc, "errors", lambda: [])()
            if not errors:
                raise TrainingArgsError(f"invalid training_args: {exc}") from None
            where = ".".join(str(p) for p in errors[0]["loc"])
            raise TrainingArgsError(f"invalid training_args.{where}: {errors[0]['msg']}") from None


def algorithm_of(training_args: dict[str, Any]) -> str:
    """The job's local algorithm; LocalError if it is not one the nodes run."""
    algorithm = str(training_args.get("algorithm", "sgd"))
    if algorithm not in LOCAL_ALGORITHMS:
        raise LocalError(f"unknown local algorithm {algorithm!r}; known: {', '.join(LOCAL_ALGORITHMS)}")
    return algorithm
