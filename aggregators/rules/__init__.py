"""Aggregation rules: small classes over pure functions, registered by name."""

from aggregators.rules.base import AggregationRule, Params, get_rule, rule_names
from aggregators.rules.fedavg import FedAvg

__all__ = ["AggregationRule", "FedAvg", "Params", "get_rule", "rule_names"]
