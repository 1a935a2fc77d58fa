"""The aggregation-rule interface and the registry of rules by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from aggregators.rules.functions import Params

_RULES: dict[str, type[AggregationRule]] = {}


class AggregationRule(ABC):
    """Folds a round's updates into the next global model, one update at a time.

    A rule sees `begin_round(global_params)`, then `add(params, n_samples, node)` per update as it
    arrives, then `end_round()` which returns the new global parameters. Streaming rules keep
    O(model) memory whatever the number of nodes.
    """

    name: ClassVar[str]

    def __init__(self, **args: Any) -> None:
        if args:
            raise ValueError(f"{self.name} takes no arguments, got {sorted(args)}")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            _RULES[cls.name] = cls

    @abstractmethod
    def begin_round(self, global_params: Params) -> None: ...

    @abstractmethod
    def add(self, params: Params, n_samples: int, node: str) -> None: ...

    @abstractmethod
    def end_round(self) -> Params: ...

    def state_dict(self) -> dict[str, Any]:
        """The round's partial state, so a restarted aggregator resumes mid-round."""
        raise NotImplementedError(f"{self.name} cannot checkpoint a round in progress")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{self.name} cannot resume a round in progress")


def get_rule(name: str, args: dict[str, Any] | None = None) -> AggregationRule:
    if name not in _RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; installed: {', '.join(rule_names())}")
    return _RULES[name](**(args or {}))


def rule_names() -> list[str]:
    return sorted(_RULES)
