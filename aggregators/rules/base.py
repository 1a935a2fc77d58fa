"""The aggregation-rule interface and the registry of rules by name.

Built-in rules register themselves by subclassing; third-party packages add rules through the
`fedbiomq.aggregators` entry-point group (see docs/aggregators.md), without editing fedbiomq.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import Any, ClassVar

import structlog

from aggregators.rules.functions import Params
from common.training.args import ALGORITHM_OF_RULE

ENTRY_POINT_GROUP = "fedbiomq.aggregators"
_RULES: dict[str, type[AggregationRule]] = {}
_BROKEN: dict[str, str] = {}
_plugins_loaded = False


class AggregationRule(ABC):
    """Folds a round's updates into the next global model.

    The aggregator calls `begin_round(global_params)`, then `add(...)` for each
    update as it arrives, then `end_round()`, which returns the new global parameters;
    `model_extra()` is published with them (e.g. SCAFFOLD's server control variate).

    `add` refuses an update it cannot use by raising ValueError (why) *before* changing any
    state: the aggregator then drops that update and the round goes on, so a half-added
    update would corrupt the round's sums. (The aggregator treats any exception from `add`
    as a refusal of that update; it cannot undo a rule's partial change.)

    Class attributes a rule declares:
      - `streaming`: True if memory stays O(model) whatever the number of updates; False if
        the rule needs all of them at once (robust statistics) and holds N x model.
      - `local_algorithm`: what the nodes must run locally ("sgd", "fedprox", "scaffold",
        "admm"); a job whose training_args say otherwise is refused up front. The built-in
        rules take theirs from the one table, `common.training.args.ALGORITHM_OF_RULE`.
    """

    name: ClassVar[str]
    streaming: ClassVar[bool] = True
    local_algorithm: ClassVar[str] = "sgd"

    def __init__(self, **args: Any) -> None:
        if args:
            raise ValueError(f"{self.name} takes no arguments, got {sorted(args)}")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # declared here, not inherited (helpers like _Buffered have none)
            if cls.name in ALGORITHM_OF_RULE and "local_algorithm" not in cls.__dict__:
                cls.local_algorithm = ALGORITHM_OF_RULE[cls.name]
            _RULES[cls.name] = cls

    @abstractmethod
    def begin_round(self, global_params: Params) -> None: ...

    @abstractmethod
    def add(self, params: Params, n_samples: int, node: str, extra: Params | None = None) -> None: ...

    @abstractmethod
    def end_round(self) -> Params: ...

    def model_extra(self) -> Params:
        """Tensors published with the global model besides its parameters (default: none)."""
        return {}

    def round_notes(self) -> dict[str, Any]:
        """What the rule says about the round it just ended, recorded in its history (e.g.
        which updates Krum selected); none by default."""
        return {}

    def carry_over(self) -> dict[str, Any]:
        """The state that lives across rounds (server momentum, control variates), saved with
        every round's checkpoint and restored with `load_state_dict`; none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The rule's state (within the round and across rounds), so a restart resumes."""
        raise NotImplementedError(f"{self.name} cannot checkpoint a round in progress")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{self.name} cannot resume a round in progress")


def _load_plugins() -> None:
    """Rules of installed third-party packages (entry points), loaded once; broken ones are
    reported by `fbm-aggregator rules`, never fatal."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not stop the service
            _BROKEN[ep.name] = f"{type(exc).__name__}: {exc}"
            structlog.get_logger("aggregator").warning("rule_plugin_broken", rule=ep.name, error=_BROKEN[ep.name])
            continue
        if not (isinstance(cls, type) and issubclass(cls, AggregationRule)):
            _BROKEN[ep.name] = f"{ep.value} is not an AggregationRule subclass"
            continue
        _RULES[ep.name] = cls


def rule_class(name: str) -> type[AggregationRule]:
    _load_plugins()
    if name not in _RULES:
        hint = f" (its plug-in failed to load: {_BROKEN[name]})" if name in _BROKEN else ""
        raise ValueError(f"unknown aggregation rule {name!r}{hint}; installed: {', '.join(rule_names())}")
    return _RULES[name]


def get_rule(name: str, args: dict[str, Any] | None = None) -> AggregationRule:
    """An instance of rule `name`; ValueError names what is installed or what is wrong."""
    cls = rule_class(name)
    try:
        return cls(**(args or {}))
    except TypeError as exc:
        raise ValueError(f"bad arguments for rule {name!r}: {exc}") from None


def rule_names() -> list[str]:
    _load_plugins()
    return sorted(_RULES)


def broken_plugins() -> dict[str, str]:
    _load_plugins()
    return dict(_BROKEN)
