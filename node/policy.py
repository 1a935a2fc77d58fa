"""What a site lets leave it, set by its admin (node.toml), enforced by the node whatever a
researcher asks. Pure settings: no torch, nothing read from data here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from common.training.args import TrainingArgs


class StatisticsPolicy(BaseModel):
    """What the site lets federated statistics reveal (node.toml `[statistics]`)."""

    extremes: Literal["off", "exact"] = Field(
        default="off", description="per-feature min/max: off (default), or exact (each is one patient's value)")
    max_bins: int = Field(default=64, ge=1, le=4096, description="most histogram bins a request may ask for")
    min_cell_count: int = Field(default=5, ge=1, description="histogram cells counting fewer patients are sent as 0")
    max_features: int = Field(default=100_000, ge=1, description="refuse statistics of wider data")
    max_pending: int = Field(default=4, ge=1, description="requests queued beyond the one being computed are refused")
    max_queries: int = Field(default=20, ge=1,
                             description="statistics answered per dataset in any 24 hours; more are refused")


class PrivacyPolicy(BaseModel):
    """The least a job must guarantee before this site trains it (node.toml `[privacy]`; per
    dataset overrides in `[privacy.datasets.NAME]`). A job asking for less is declined with
    the rule it broke. Defaults stop the one-record extraction of docs/privacy.md."""

    min_batch_size: int = Field(default=8, ge=1, description="smallest batch a job may train with")
    min_records_per_update: int = Field(default=32, ge=1, description="fewest records one update may be computed from")
    min_quorum: int = Field(default=1, ge=1, description="fewest sites every round of a job must aggregate")
    dp_required: bool = Field(default=False, description="decline jobs without client-level DP")
    dp_min_noise_multiplier: float = Field(default=0.5, ge=0, description="smallest DP sigma accepted when DP is used")
    dp_max_clip: float = Field(default=10.0, gt=0, description="largest DP clip norm accepted")
    epsilon_budget: float | None = Field(default=None, gt=0, description="the dataset's total epsilon (None: no budget)")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="delta of each job's (epsilon, delta) guarantee")
    zoo_plans: list[str] | None = Field(default=None, description="zoo plans run without approval (None: all)")
    datasets: dict[str, dict] = Field(default_factory=dict, description="per-dataset overrides of the fields above")

    def for_dataset(self, name: str) -> PrivacyPolicy:
        """This policy with dataset `name`'s overrides applied (validated like the rest)."""
        overrides = self.datasets.get(name)
        if not overrides:
            return self
        return PrivacyPolicy.model_validate({**self.model_dump(exclude={"datasets"}), **overrides})


@dataclass(frozen=True)
class JobAsk:
    """What a job asks of a site, as the policy reads it (from the spec and its training args)."""

    rounds: int
    quorum: int
    batch_size: int
    max_batches: int | None
    epochs: int
    dp_clip: float | None
    dp_sigma: float | None
    dp_mode: str | None = None  # "client" ({clip, sigma}) or "sample" (DP-SGD)
    algorithm: str = "sgd"
    val_fraction: float = 0.0


def _dp_fields(dp: dict | None) -> tuple[str | None, float | None, float | None]:
    """(mode, clip, noise multiplier) of `training_args.dp` in either mode; ValueError if unknown."""
    if not dp:
        return None, None, None
    mode = str(dp.get("mode", "client"))
    if mode == "client":
        return mode, float(dp["clip"]), float(dp["sigma"])
    if mode == "sample":
        return mode, float(dp["max_grad_norm"]), float(dp["noise_multiplier"])
    raise ValueError(f"training_args.dp mode {mode!r} is not client ({{clip, sigma}}) or sample "
                     "({noise_multiplier, max_grad_norm})")


def job_ask(rounds: int, quorum: int, training_args: dict) -> JobAsk:
    """A JobAsk from a job's fields; ValueError if its training args are not numbers."""
    args = TrainingArgs.of(training_args)
    mode, clip, sigma = _dp_fields(args.dp or None)
    return JobAsk(rounds=int(rounds), quorum=int(quorum), batch_size=args.batch_size, max_batches=args.max_batches,
                  epochs=args.epochs, dp_clip=clip, dp_sigma=sigma, dp_mode=mode, algorithm=args.algorithm,
                  val_fraction=args.val_fraction)


def schedule_args(ask: JobAsk) -> dict:
    """The training args `common.training.local.dp_sgd_schedule` reads, from a JobAsk."""
    return {"batch_size": ask.batch_size, "epochs": ask.epochs, "max_batches": ask.max_batches,
            "val_fraction": ask.val_fraction}


def policy_refusal(policy: PrivacyPolicy, ask: JobAsk, dataset_rows: int) -> str | None:
    """Which rule of the site's policy the job breaks (None: it keeps them all)."""
    records = dataset_rows if ask.max_batches is None else min(dataset_rows, ask.batch_size * ask.max_batches)
    rules = [
        (ask.batch_size < policy.min_batch_size, f"batch_size {ask.batch_size} is below the minimum {policy.min_batch_size}"),
        (records < policy.min_records_per_update,
         f"an update would be computed from {records} records; the minimum is {policy.min_records_per_update}"),
        (ask.quorum < policy.min_quorum, f"quorum {ask.quorum} is below the minimum of {policy.min_quorum} sites a round"),
        (policy.dp_required and ask.dp_sigma is None,
         "this site requires client-level DP or DP-SGD (training_args.dp)"),
        (policy.epsilon_budget is not None and ask.dp_sigma is None,
         "this dataset has a privacy budget: jobs must use client-level DP or DP-SGD (training_args.dp)"),
        (ask.dp_mode == "sample" and ask.algorithm != "sgd",
         f"DP-SGD runs the plain sgd local algorithm only, not {ask.algorithm!r}"),
        (ask.dp_sigma is not None and ask.dp_sigma < policy.dp_min_noise_multiplier,
         f"DP sigma {ask.dp_sigma} is below the minimum {policy.dp_min_noise_multiplier}"),
        (ask.dp_clip is not None and not 0 < ask.dp_clip <= policy.dp_max_clip,
         f"DP clip {ask.dp_clip} is outside (0, {policy.dp_max_clip}]"),
    ]
    return next((f"privacy policy: {why}" for broken, why in rules if broken), None)
