"""The node half of the algorithms: pure functions checked by hand."""

from __future__ import annotations

import pytest
import torch

from common.training import local

T = torch.tensor


def test_proximal_penalty_is_half_mu_squared_distance():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(T([[1.0, 2.0]]))
    penalty = local.proximal_penalty(model, {"weight": T([[0.0, 0.0]])}, 0.5)
    assert float(penalty.detach()) == pytest.approx(0.5 * 0.5 * 5.0)


def test_scaffold_control_update_option_two():
    c, ci = {"w": T([1.0])}, {"w": T([0.5])}
    new = local.scaffold_new_control(c, ci, {"w": T([2.0])}, {"w": T([1.0])}, steps=10, lr=0.1)
    assert torch.allclose(new["w"], T([0.5 - 1.0 + (2.0 - 1.0) / (10 * 0.1)]))


def test_scaffold_correction_adds_c_minus_ci_to_gradients():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.grad = torch.zeros(1, 1)
    local.scaffold_correct_(model, {"weight": T([[0.3]])}, {"weight": T([[0.1]])})
    assert torch.allclose(model.weight.grad, T([[0.2]]))


def test_admm_dual_ascent():
    assert torch.allclose(local.admm_dual({"w": T([1.0])}, {"w": T([3.0])}, {"w": T([2.0])})["w"], T([2.0]))


def _seeded(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)


def test_dp_clips_to_the_norm_and_adds_noise_of_the_stated_scale():
    delta = {"w": torch.full((10_000,), 1.0)}  # norm 100
    noiseless, norm = local.clip_and_noise(delta, clip=1.0, sigma=0.0)
    assert norm == pytest.approx(100.0) and float(noiseless["w"].norm()) == pytest.approx(1.0, rel=1e-4)
    noisy, _ = local.clip_and_noise(delta, clip=1.0, sigma=2.0)
    assert float((noisy["w"] - noiseless["w"]).std()) == pytest.approx(2.0, rel=0.05)
    small, _ = local.clip_and_noise({"w": T([0.1, 0.0])}, clip=1.0, sigma=0.0)
    assert torch.allclose(small["w"], T([0.1, 0.0]))  # under the clip: unchanged
    fixed_a, _ = local.clip_and_noise(delta, clip=1.0, sigma=2.0, noise=_seeded(0))
    fixed_b, _ = local.clip_and_noise(delta, clip=1.0, sigma=2.0, noise=_seeded(0))
    assert torch.equal(fixed_a["w"], fixed_b["w"])  # tests can still fix the noise


def test_csprng_normal_is_standard_normal_and_never_repeats():
    z = local.csprng_normal((200_000,))
    assert z.dtype == torch.float64 and abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1.0, abs=0.01)
    assert abs(float((z**3).mean())) < 0.03 and float((z**4).mean()) == pytest.approx(3.0, abs=0.06)  # skew, kurtosis
    assert not torch.equal(local.csprng_normal((64,)), local.csprng_normal((64,)))
    assert local.csprng_normal((3, 5)).shape == (3, 5) and local.csprng_normal((7,)).shape == (7,)


def test_validation_split_is_fixed_disjoint_and_complete():
    tr, va = local.validation_split(100, 0.2, seed=3)
    tr2, va2 = local.validation_split(100, 0.2, seed=3)
    assert torch.equal(va, va2) and len(va) == 20 and len(tr) == 80
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    with pytest.raises(local.LocalError):
        local.validation_split(1, 0.5, seed=0)


def test_standardize_uses_the_given_statistics_and_keeps_the_shape():
    x = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)
    out = local.standardize(x, [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    assert out.shape == x.shape and torch.allclose(out, (x - 1) / 2)
    with pytest.raises(local.LocalError, match="feature statistics"):
        local.standardize(x, [0.0], [1.0])


def test_unknown_algorithm_is_named():
    with pytest.raises(local.LocalError, match="known: sgd"):
        local.algorithm_of({"algorithm": "fedsomething"})


def test_local_algorithms_are_objects_named_as_their_rules():
    from aggregators.rules.base import _RULES

    assert set(local.ALGORITHMS) == set(local.LOCAL_ALGORITHMS)
    for rule, algorithm in local.ALGORITHM_OF_RULE.items():  # node and server halves share names
        assert local.ALGORITHMS[algorithm].__name__ == _RULES[rule].__name__


def test_local_algorithm_halves():
    start, end = {"w": T([1.0])}, {"w": T([0.5])}
    args = {"mu": 0.5, "rho": 0.2, "lr": 0.1}
    sgd = local.local_algorithm(args, start, {}, {})
    assert sgd.penalty(torch.nn.Linear(1, 1)) is None and sgd.finish(start, end, end, 3) == (end, {}, {})
    admm = local.local_algorithm({**args, "algorithm": "admm"}, start, {"u": {"w": T([0.1])}, "x": {"w": T([2.0])}}, {})
    assert torch.allclose(admm.u["w"], T([1.1])) and admm.strength == 0.2  # u + x - z
    sent, extra, kept = admm.finish(start, end, end, 3)
    assert torch.allclose(sent["w"], T([1.6])) and extra == {} and set(kept) == {"x", "u"}
    scaffold = local.local_algorithm({**args, "algorithm": "scaffold"}, start, {}, {local.SCAFFOLD_PREFIX + "w": T([0.2])})
    sent, extra, kept = scaffold.finish(start, end, end, 10)
    assert torch.allclose(kept["c"]["w"], T([-0.2 + 0.5])) and torch.allclose(extra["c/w"], kept["c"]["w"])


def test_client_dp_is_a_post_step():
    received, params = {"w": T([0.0, 0.0])}, {"w": T([3.0, 4.0])}
    assert local.client_dp(params, received, {}) is params
    clipped = local.client_dp(params, received, {"dp": {"clip": 1.0, "sigma": 0.0}})
    assert torch.allclose(clipped["w"], T([0.6, 0.8]))
