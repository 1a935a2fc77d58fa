"""FedAvg: streaming folding equals the formula, computed independently here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregators.rules import FedAvg, get_rule, rule_names
from aggregators.rules.functions import weighted_mean
from aggregators.service import check_update


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=8), st.integers(0, 1000))
def test_streaming_fedavg_is_the_sample_weighted_mean(counts, seed):
    gen = torch.Generator().manual_seed(seed)
    updates = [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)} for _ in counts]
    rule = FedAvg()
    rule.begin_round(updates[0])
    for params, n in zip(updates, counts, strict=True):
        rule.add(params, n, "node")
    out = rule.end_round()
    total = sum(counts)
    for key in ("w", "b"):
        manual = sum(u[key].double() * n for u, n in zip(updates, counts, strict=True)) / total
        torch.testing.assert_close(out[key], manual.float())
        torch.testing.assert_close(out[key], weighted_mean(list(zip(updates, counts, strict=True)))[key])
        assert out[key].dtype == torch.float32


def test_integer_buffers_stay_integers():
    rule = FedAvg()
    rule.begin_round({"steps": torch.tensor(0)})
    rule.add({"steps": torch.tensor(10)}, 1, "a")
    rule.add({"steps": torch.tensor(21)}, 1, "b")
    assert rule.end_round()["steps"].dtype == torch.int64


def test_registry_and_errors():
    assert "fedavg" in rule_names()
    with pytest.raises(ValueError, match="unknown aggregation rule 'nope'"):
        get_rule("nope")
    with pytest.raises(ValueError, match="takes no arguments"):
        get_rule("fedavg", {"mu": 1})
    rule = FedAvg()
    rule.begin_round({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="no update"):
        rule.end_round()


def test_update_checks():
    ref = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    assert check_update({"w": torch.ones(2, 2), "b": torch.ones(2)}, ref) is None
    assert "names differ" in check_update({"w": torch.ones(2, 2)}, ref)
    assert "expected torch.float32[2, 2]" in check_update({"w": torch.ones(3, 2), "b": torch.ones(2)}, ref)
    assert "NaN" in check_update({"w": torch.full((2, 2), float("nan")), "b": torch.ones(2)}, ref)
    assert "expected torch.float32" in check_update({"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.ones(2)}, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_found_whatever_the_dtype_and_layout(dtype, bad):
    """check_update's finite test (numpy where it can, torch for bfloat16 and the rest)."""
    ref = {"w": torch.zeros(3, 4, dtype=dtype)}
    strided = torch.zeros(4, 3, dtype=dtype).t()  # not contiguous
    strided[2, 1] = bad
    assert "NaN or Inf" in check_update({"w": strided}, ref)
    graded = torch.zeros(3, 4, dtype=dtype, requires_grad=dtype != torch.float16)
    with torch.no_grad():
        graded[1, 3] = bad
    assert "NaN or Inf" in check_update({"w": graded}, ref)
    assert check_update({"w": torch.ones(3, 4, dtype=dtype)}, ref) is None
