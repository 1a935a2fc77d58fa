"""Fixed-point encoding in Z_2^32: the stated quantisation bound holds and the sum never wraps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg.encoding import Encoding, ring_add


def ring_sum(parts: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(parts[0])
    for p in parts:
        total = ring_add(total, p)
    return total


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), clip=st.floats(0.01, 100.0), max_count=st.integers(1, 100_000),
       seed=st.integers(0, 2**32 - 1))
def test_decoded_sum_is_within_the_stated_bound(n, clip, max_count, seed):
    rng = np.random.default_rng(seed)
    enc = Encoding(clip, n, max_count)
    xs = [rng.uniform(-1.5 * clip, 1.5 * clip, 64) for _ in range(n)]  # some values get clipped
    counts = [int(rng.integers(1, max_count + 1)) for _ in range(n)]
    weighted, total = enc.decode_sum(ring_sum([enc.encode(x, c) for x, c in zip(xs, counts, strict=True)]))
    exact = sum(c * np.clip(x, -clip, clip) for x, c in zip(xs, counts, strict=True))
    assert total == sum(counts)
    # the bound is the encoding's; float64 adds its own rounding of values up to n x count x R
    rounding = 8 * np.finfo(np.float64).eps * n * max_count * clip
    assert np.abs(weighted - exact).max() <= enc.sum_error_bound(n) + rounding
    assert np.abs(weighted / total - exact / total).max() <= enc.mean_error_bound(n, total) + rounding / total


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_inputs_of_every_site_do_not_wrap(sign):
    """n sites all at +R (or -R) with the largest count: the worst case for the ring."""
    n, clip, m = 100, 3.0, 40_000_000
    enc = Encoding(clip, n, m)
    parts = [enc.encode(np.full(8, sign * clip * 10), m) for _ in range(n)]
    weighted, total = enc.decode_sum(ring_sum(parts))
    assert total == n * m
    np.testing.assert_allclose(weighted, sign * clip * n * m, rtol=1e-6)


def test_bound_formula_matches_the_documented_one():
    enc = Encoding(1.0, 10, 1)
    q = (2**31 - 1) // 10
    assert enc.q_max == q
    assert enc.sum_error_bound(10) == pytest.approx(10 * 1 * 1.0 / (2 * q))
    assert enc.mean_error_bound(10, 10) == pytest.approx(1.0 / (2 * q))  # ~ n R / 2^32


def test_counts_above_the_maximum_are_clipped_and_parameters_checked():
    enc = Encoding(1.0, 4, 10)
    assert enc.encode(np.zeros(2), 50)[-1] == 10
    with pytest.raises(ValueError, match="2\\^32"):
        Encoding(1.0, 2**16, 2**16)
    with pytest.raises(ValueError):
        Encoding(0.0, 4, 10)
    with pytest.raises(ValueError):
        enc.encode(np.zeros(2), 0)
