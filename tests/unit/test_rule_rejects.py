"""A bad update is refused by a rule before it touches the round's sums (issue 17, attack 6).

`add` raises ValueError, naming what is wrong, and leaves the rule exactly as it was: the
round then ends as if the bad update had never been offered.
"""

from __future__ import annotations

import pytest
import torch

from aggregators.rules import get_rule
from aggregators.rules.functions import add_weighted_, zeros_like
from aggregators.service import check_sample_count

T = torch.tensor
START = {"w": T([0.0, 0.0]), "b": T([0.0]), "steps": T([0])}
GOOD = [{"w": T([1.0, 2.0]), "b": T([0.5]), "steps": T([1])}, {"w": T([3.0, 1.0]), "b": T([1.5]), "steps": T([3])},
        {"w": T([2.0, 2.0]), "b": T([1.0]), "steps": T([2])}]
CONTROL = [{"c/w": T([0.1, 0.2]), "c/b": T([0.3])}, {"c/w": T([0.0, 0.4]), "c/b": T([-0.1])},
           {"c/w": T([0.2, 0.2]), "c/b": T([0.2])}]
RULES = [("fedavg", {}), ("fedprox", {}), ("scaffold", {}), ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}),
         ("fedavgm", {}), ("fedmedian", {}), ("trimmedmean", {}), ("krum", {"byzantine": 0}), ("admm", {})]


def _round(name, args, bad=None, bad_extra=None):
    """GOOD[0], then the bad update (if any, which must be refused), then GOOD[1:]."""
    rule = get_rule(name, args)
    rule.begin_round(START)
    rule.add(GOOD[0], 10, "n0", CONTROL[0])
    if bad is not None:
        with pytest.raises(ValueError, match=r"shape|names differ"):
            rule.add(bad, 10, "evil", bad_extra if bad_extra is not None else CONTROL[0])
    for i in (1, 2):
        rule.add(GOOD[i], 10 * (i + 1), f"n{i}", CONTROL[i])
    return rule.end_round(), rule.model_extra()


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "args"), RULES)
@pytest.mark.parametrize("bad", [
    {"w": T([1.0, 2.0]), "b": T([1.0, 2.0, 3.0]), "steps": T([1])},  # the last float tensor mis-shaped
    {"w": T([1.0, 2.0]), "b": T([1.0]), "steps": T([1, 2])},  # the last tensor mis-shaped
    {"w": T([1.0, 2.0]), "b": T([1.0])},  # a tensor missing
    {"w": T([1.0, 2.0]), "b": T([1.0]), "steps": T([1]), "x": T([1.0])},  # an unexpected tensor
], ids=["float-shape", "last-shape", "missing", "unexpected"])
def test_a_mis_shaped_update_is_refused_and_leaves_no_trace(name, args, bad):
    clean = _round(name, args)
    after = _round(name, args, bad=bad)
    assert _equal(after[0], clean[0]) and _equal(after[1], clean[1])


@pytest.mark.parametrize(("extra", "why"), [
    ({"c/w": T([0.1, 0.2])}, "lacks"),
    ({"c/w": T([0.1, 0.2]), "c/b": T([0.1, 0.2, 0.3])}, "shape"),
    ({"c/w": T([0.1, 0.2]), "c/b": T([float("nan")])}, "NaN"),
    ({"c/w": T([0.1, 0.2]), "c/b": T([float("inf")])}, "Inf"),
    ({"c/w": T([0.1, 0.2]), "c/b": T([1])}, "float"),
], ids=["missing", "shape", "nan", "inf", "integer"])
def test_scaffold_refuses_a_bad_control_delta_before_summing_any_of_it(extra, why):
    clean = _round("scaffold", {})
    rule = get_rule("scaffold")
    rule.begin_round(START)
    rule.add(GOOD[0], 10, "n0", CONTROL[0])
    with pytest.raises(ValueError, match=why):
        rule.add(GOOD[1], 20, "evil", extra)
    rule.add(GOOD[1], 20, "n1", CONTROL[1])
    rule.add(GOOD[2], 30, "n2", CONTROL[2])
    after = rule.end_round(), rule.model_extra()
    assert _equal(after[0], clean[0]) and _equal(after[1], clean[1])


def test_add_weighted_checks_every_tensor_before_adding_any():
    acc = zeros_like({"a": T([0.0]), "b": T([0.0, 0.0])})
    with pytest.raises(ValueError, match="b"):
        add_weighted_(acc, {"a": T([5.0]), "b": T([1.0])}, 1.0)
    assert torch.equal(acc["a"], T([0.0], dtype=torch.float64))


def test_extras_must_be_finite():
    from aggregators.service import check_extra  # new with the defence

    assert check_extra({"c/w": T([0.1, 0.2])}) is None
    assert "NaN or Inf" in check_extra({"c/w": T([0.1, float("nan")])})
    assert "NaN or Inf" in check_extra({"c/w": T([float("-inf")])})


def test_a_node_that_declared_no_samples_for_the_job_has_no_weight():
    """The cap used to be skipped when the node never declared a count (attack 3)."""
    assert check_sample_count(100, declared=100) is None
    assert "exceeds" in check_sample_count(101, declared=100)
    assert "declared no dataset" in check_sample_count(10**15, declared=None)
