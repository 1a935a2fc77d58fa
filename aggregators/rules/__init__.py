"""Aggregation rules: small classes over pure functions, registered by name."""

from aggregators.rules.admm import ADMM
from aggregators.rules.base import (
    ENTRY_POINT_GROUP,
    AggregationRule,
    Params,
    broken_plugins,
    get_rule,
    rule_class,
    rule_names,
)
from aggregators.rules.fedavg import FedAvg, FedProx
from aggregators.rules.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from aggregators.rules.robust import FedMedian, Krum, TrimmedMean
from aggregators.rules.scaffold import Scaffold

__all__ = ["ADMM", "ENTRY_POINT_GROUP", "AggregationRule", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian",
           "FedProx", "FedYogi", "Krum", "Params", "Scaffold", "TrimmedMean", "broken_plugins", "get_rule",
           "rule_class", "rule_names"]
