"""Turning a job's plan reference into a TrainingPlan class (zoo name or verified source text)."""

from __future__ import annotations

import hashlib
import types
from typing import TYPE_CHECKING

from common.messages import PlanRef
from common.training.catalog import ZOO_ALGORITHMS

if TYPE_CHECKING:
    from common.training.plan import TrainingPlan


class PlanError(ValueError):
    """The plan reference cannot be turned into a plan; the message says why."""


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def check_ref(ref: PlanRef) -> None:
    """Refuse references that are malformed, unknown or whose source does not match its hash."""
    if (ref.zoo is None) == (ref.source is None):
        raise PlanError("a plan is either a zoo name or source text, exactly one of the two")
    if ref.zoo is not None and ref.zoo not in ZOO_ALGORITHMS:
        raise PlanError(f"unknown zoo plan {ref.zoo!r}; the zoo has: {', '.join(sorted(ZOO_ALGORITHMS))}")
    if ref.source is not None:
        if not ref.class_name:
            raise PlanError("a plan given as source must name its class (class_name)")
        if ref.sha256 != source_sha256(ref.source):
            raise PlanError("the plan source does not match its sha256")


def load_plan_class(ref: PlanRef) -> type[TrainingPlan]:
    """The plan class. Source plans are executed: only call this for approved plans (in a
    training process: this imports torch)."""
    from common.training.plan import TrainingPlan  # noqa: PLC0415 - torch: not in the node process
    from common.training.zoo import ZOO  # noqa: PLC0415

    check_ref(ref)
    if ref.zoo is not None:
        return ZOO[ref.zoo]
    module = types.ModuleType(f"fbm_plan_{ref.sha256[:12]}")
    exec(compile(ref.source, f"<plan {ref.sha256[:12]}>", "exec"), module.__dict__)  # noqa: S102
    cls = module.__dict__.get(ref.class_name)
    if not (isinstance(cls, type) and issubclass(cls, TrainingPlan)):
        raise PlanError(f"the plan source defines no TrainingPlan subclass named {ref.class_name!r}")
    return cls
