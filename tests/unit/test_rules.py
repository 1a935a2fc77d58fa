"""Every rule against hand-computed small cases, and against independent numpy references.

The references below are written from the papers' formulas with numpy, not from our code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregators.rules import get_rule, rule_names

T = torch.tensor


def run_round(rule, start, updates, weights=None, extras=None):
    rule.begin_round(start)
    for i, u in enumerate(updates):
        rule.add(u, (weights or [1] * len(updates))[i], f"n{i}", (extras or [None] * len(updates))[i])
    return rule.end_round()


def test_every_rule_is_installed():
    assert {"fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
            "trimmedmean", "krum", "admm"} <= set(rule_names())


# --- hand-computed cases ------------------------------------------------------------------------

def test_fedavg_weights_by_samples():
    out = run_round(get_rule("fedavg"), {"w": T([0.0, 0.0])}, [{"w": T([1.0, 2.0])}, {"w": T([4.0, 8.0])}], [1, 3])
    assert torch.allclose(out["w"], T([3.25, 6.5]))  # (1*1 + 3*4)/4, (2 + 24)/4


def test_median_odd_even_and_ties():
    med = get_rule("fedmedian")
    assert torch.equal(run_round(med, {"w": T([0.0])}, [{"w": T([1.0])}, {"w": T([9.0])}, {"w": T([2.0])}])["w"], T([2.0]))
    assert torch.equal(run_round(med, {"w": T([0.0])}, [{"w": T([1.0])}, {"w": T([9.0])}, {"w": T([2.0])},
                                                         {"w": T([4.0])}])["w"], T([3.0]))  # (2 + 4) / 2
    assert torch.equal(run_round(med, {"w": T([0.0])}, [{"w": T([5.0])}] * 4)["w"], T([5.0]))  # ties
    # an outlier moves the mean, not the median
    assert torch.equal(run_round(med, {"w": T([0.0])}, [{"w": T([1.0])}, {"w": T([1.0])}, {"w": T([1e9])}])["w"], T([1.0]))


def test_trimmed_mean_drops_both_tails():
    rule = get_rule("trimmedmean", {"beta": 0.2})  # 5 values: trim 1 from each end
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    out = run_round(rule, {"w": T([0.0])}, [{"w": T([v])} for v in vals])
    assert torch.allclose(out["w"], T([3.0]))  # mean of 2, 3, 4
    assert torch.allclose(run_round(get_rule("trimmedmean", {"beta": 0.0}), {"w": T([0.0])},
                                    [{"w": T([v])} for v in vals])["w"], T([22.0]))


def test_krum_picks_the_update_among_its_neighbours_and_multi_krum_averages():
    updates = [{"w": T([0.0, 0.0])}, {"w": T([0.1, 0.0])}, {"w": T([0.0, 0.1])}, {"w": T([0.1, 0.1])},
               {"w": T([50.0, -50.0])}]
    krum = get_rule("krum", {"byzantine": 1})
    out = run_round(krum, {"w": T([0.0, 0.0])}, updates)
    # scores (n - f - 2 = 2 nearest): the four honest points score 0.02, 0.03, 0.03, 0.03 -> index 0
    assert torch.equal(out["w"], T([0.0, 0.0])) and krum.selected == ["n0"]
    multi = get_rule("krum", {"byzantine": 1, "m": 4})
    out = run_round(multi, {"w": T([0.0, 0.0])}, updates)
    assert torch.allclose(out["w"], T([0.05, 0.05])) and "n4" not in multi.selected


def test_krum_needs_more_than_f_plus_2_updates():
    with pytest.raises(ValueError, match="at least 4"):
        run_round(get_rule("krum", {"byzantine": 1}), {"w": T([0.0])}, [{"w": T([1.0])}] * 3)


def test_fedadam_first_step_by_hand():
    rule = get_rule("fedadam", {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01})
    out = run_round(rule, {"w": T([1.0])}, [{"w": T([2.0])}])  # delta = 1
    m = 0.1 * 1.0
    v = 0.99 * 0.01**2 + 0.01 * 1.0
    assert torch.allclose(out["w"], T([1.0 + 0.1 * m / (v**0.5 + 0.01)]), atol=1e-6)


def test_fedavgm_accumulates_momentum_across_rounds():
    rule = get_rule("fedavgm", {"lr": 1.0, "beta1": 0.5})
    w = run_round(rule, {"w": T([0.0])}, [{"w": T([1.0])}])  # m = 1, w = 1
    w = run_round(rule, w, [{"w": T([2.0])}])  # delta = 1, m = 0.5 + 1, w = 2.5
    assert torch.allclose(w["w"], T([2.5]))


@pytest.mark.parametrize("name", ["fedyogi", "fedavgm", "scaffold"])
def test_cross_round_state_survives_a_round_checkpoint(name):
    """What the aggregator saves with each round (carry_over) is enough to go on identically."""
    a, b = get_rule(name), get_rule(name)
    extra = [{"c/w": T([0.1, -0.2])}] if name == "scaffold" else None
    w = run_round(a, {"w": T([0.0, 1.0])}, [{"w": T([1.0, 0.0])}], extras=extra)
    assert a.carry_over()
    b.load_state_dict(a.carry_over())
    assert torch.equal(run_round(a, w, [{"w": T([2.0, 2.0])}], extras=extra)["w"],
                       run_round(b, w, [{"w": T([2.0, 2.0])}], extras=extra)["w"])
    if name == "scaffold":
        assert torch.equal(a.model_extra()["c/w"], b.model_extra()["c/w"])


def test_scaffold_moves_the_model_and_the_control():
    rule = get_rule("scaffold", {"lr_global": 1.0})
    start = {"w": T([0.0, 0.0])}
    out = run_round(rule, start, [{"w": T([1.0, 0.0])}, {"w": T([3.0, 2.0])}], [1, 1],
                    [{"c/w": T([0.5, 0.0])}, {"c/w": T([1.5, 1.0])}])
    assert torch.allclose(out["w"], T([2.0, 1.0]))
    assert torch.allclose(rule.model_extra()["c/w"], T([1.0, 0.5]))  # mean of the deltas (all nodes took part)
    with pytest.raises(ValueError, match="control delta"):
        run_round(rule, out, [{"w": T([1.0, 0.0])}])


def test_admm_consensus_is_the_unweighted_mean_unless_asked():
    ups = [{"w": T([0.0])}, {"w": T([3.0])}]
    assert torch.allclose(run_round(get_rule("admm"), {"w": T([0.0])}, ups, [1, 100])["w"], T([1.5]))
    assert torch.allclose(run_round(get_rule("admm", {"weighted": True}), {"w": T([0.0])}, ups, [1, 2])["w"], T([2.0]))


def test_integer_buffers_keep_their_dtype_in_every_rule():
    for name in ["fedavg", "fedmedian", "trimmedmean", "fedadam", "fedavgm", "admm"]:
        out = run_round(get_rule(name), {"n": T(0), "w": T([0.0])},
                        [{"n": T(10), "w": T([1.0])}, {"n": T(12), "w": T([2.0])}, {"n": T(11), "w": T([3.0])}])
        assert out["n"].dtype == torch.int64 and out["w"].dtype == torch.float32, name


def test_bad_arguments_are_refused_with_the_rule_name():
    with pytest.raises(ValueError, match="fedadam"):
        get_rule("fedadam", {"momentum": 1})
    with pytest.raises(ValueError, match="beta"):
        get_rule("trimmedmean", {"beta": 0.7})


# --- independent references on random inputs --------------------------------------------------

def ref_fedavg(xs, ws):
    return np.average(np.stack(xs), axis=0, weights=ws)


def ref_median(xs):
    return np.median(np.stack(xs), axis=0)


def ref_trimmed(xs, trim):
    s = np.sort(np.stack(xs), axis=0)
    return s[trim : len(xs) - trim].mean(axis=0)


def ref_krum_index(xs, f):
    n = len(xs)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((xs[i] - xs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return int(np.argmin(scores))


def ref_adam(x, avg, lr, b1, b2, tau):
    delta = avg - x
    m = (1 - b1) * delta
    v = b2 * tau**2 + (1 - b2) * delta**2
    return x + lr * m / (np.sqrt(v) + tau)


vectors = st.integers(3, 8).flatmap(lambda n: st.lists(
    arrays(np.float64, (4,), elements=st.floats(-100, 100, allow_nan=False)), min_size=n, max_size=n))


def _p(x):
    return {"w": torch.from_numpy(np.asarray(x, dtype=np.float64))}


@settings(max_examples=200, deadline=None)
@given(vectors, st.lists(st.integers(1, 1000), min_size=8, max_size=8))
def test_fedavg_median_trimmed_agree_with_numpy(xs, ws):
    ws = ws[: len(xs)]
    start = _p(np.zeros(4))
    assert np.allclose(run_round(get_rule("fedavg"), start, [_p(x) for x in xs], ws)["w"].numpy(), ref_fedavg(xs, ws))
    assert np.allclose(run_round(get_rule("fedmedian"), start, [_p(x) for x in xs])["w"].numpy(), ref_median(xs))
    trim = min(int(np.ceil(0.2 * len(xs))), (len(xs) - 1) // 2)
    assert np.allclose(run_round(get_rule("trimmedmean", {"beta": 0.2}), start, [_p(x) for x in xs])["w"].numpy(),
                       ref_trimmed(xs, trim))


@settings(max_examples=200, deadline=None)
@given(vectors.filter(lambda xs: len(xs) >= 4))
def test_krum_agrees_with_a_direct_implementation(xs):
    krum = get_rule("krum", {"byzantine": 1})
    out = run_round(krum, _p(np.zeros(4)), [_p(x) for x in xs])
    chosen = int(krum.selected[0][1:])
    ref = ref_krum_index(xs, 1)
    # ties between equal scores may pick either: the chosen one must score as low as the reference
    assert chosen == ref or np.isclose(_krum_score(xs, chosen), _krum_score(xs, ref))
    assert np.allclose(out["w"].numpy(), xs[chosen])


def _krum_score(xs, i, f=1):
    d = sorted(float(np.sum((xs[i] - xs[j]) ** 2)) for j in range(len(xs)) if j != i)
    return sum(d[: len(xs) - f - 2])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (4,), elements=st.floats(-10, 10)), vectors)
def test_fedadam_agrees_with_the_papers_formula(x0, xs):
    rule = get_rule("fedadam", {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3})
    out = run_round(rule, _p(x0), [_p(x) for x in xs])
    assert np.allclose(out["w"].numpy(), ref_adam(x0, np.mean(np.stack(xs), axis=0), 0.05, 0.9, 0.99, 1e-3))


def test_node_selection_policies():
    from aggregators.service import select_nodes
    from common.messages import Selection

    nodes = [f"n{i}" for i in range(10)]
    assert select_nodes(Selection(), 1, 1, nodes) == nodes
    assert select_nodes(Selection(mode="at_least", k=8), 1, 1, nodes) == nodes  # k only delays the round
    half = select_nodes(Selection(mode="fraction", fraction=0.3, seed=4), 1, 1, nodes)
    assert len(half) == 3 and set(half) <= set(nodes)
    assert select_nodes(Selection(mode="fraction", fraction=0.3, seed=4), 1, 1, nodes) == half  # reproducible
    rounds = {tuple(select_nodes(Selection(mode="fraction", fraction=0.3, seed=4), 1, r, nodes)) for r in range(1, 9)}
    assert len(rounds) > 1  # a new draw each round
    assert len(select_nodes(Selection(mode="fraction", fraction=0.1, k=4), 1, 1, nodes)) == 4  # at least k
    assert len(select_nodes(Selection(mode="fraction", fraction=0.1), 5, 1, nodes)) == 5  # at least the quorum
    assert select_nodes(Selection(mode="fraction", fraction=0.5, k=9), 1, 1, nodes[:3]) == nodes[:3]  # no more than exist
