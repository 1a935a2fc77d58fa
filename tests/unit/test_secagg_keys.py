"""Key agreement, PRG, pairwise masks, share boxes and the neighbour graph."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import graph, prg
from common.secagg.config import SecAggError, check_parameters
from common.secagg.keys import BoxError, Context, KeyPair, agree, open_box, seal
from common.secagg.masks import pair_seed, pairwise_mask


def test_both_ends_derive_the_same_seed_bound_to_round_and_purpose():
    a, b = KeyPair.generate(), KeyPair.generate()
    ctx = Context("job", 3)
    ab = agree(ctx, "mask", a, "alice", b.public_bytes(), "bob")
    assert ab == agree(ctx, "mask", b, "bob", a.public_bytes(), "alice")
    assert ab != agree(Context("job", 4), "mask", a, "alice", b.public_bytes(), "bob")
    assert ab != agree(ctx, "box", a, "alice", b.public_bytes(), "bob")
    assert ab != agree(ctx, "mask", a, "alice", b.public_bytes(), "carol")


def test_prg_is_deterministic_and_seed_dependent():
    v = prg.expand(bytes(32), 1000)
    assert v.dtype == np.uint32 and v.shape == (1000,)
    assert np.array_equal(v, prg.expand(bytes(32), 1000))
    assert np.array_equal(prg.expand(bytes(32), 10), v[:10])
    assert not np.array_equal(v, prg.expand(b"\x01" + bytes(31), 1000))


def test_pairwise_masks_cancel():
    a, b = KeyPair.generate(), KeyPair.generate()
    ctx = Context("j", 0)
    ma = pairwise_mask(pair_seed(ctx, a, "a", b.public_bytes(), "b"), "a", "b", 500)
    mb = pairwise_mask(pair_seed(ctx, b, "b", a.public_bytes(), "a"), "b", "a", 500)
    assert not np.any(ma == 0) or not np.array_equal(ma, mb)
    assert np.array_equal((ma + mb).astype(np.uint32), np.zeros(500, np.uint32))


def test_box_opens_only_for_its_pair_and_round():
    ctx, key = Context("j", 1), bytes(range(32))
    box = seal(key, ctx, "a", "b", b"share")
    assert open_box(key, ctx, "a", "b", box) == b"share"
    for bad in [(key, Context("j", 2), "a", "b"), (key, ctx, "b", "a"), (bytes(32), ctx, "a", "b")]:
        with pytest.raises(BoxError):
            open_box(*bad, box)


def test_graph_is_symmetric_deterministic_and_k_regular():
    sites = [f"s{i}" for i in range(50)]
    g = graph.neighbours(sites, 8, b"seed" * 4)
    assert g == graph.neighbours(list(reversed(sites)), 8, b"seed" * 4)
    assert g != graph.neighbours(sites, 8, b"other" * 4)
    assert all(len(n) == 8 and p not in n for p, n in g.items())
    assert all(p in g[q] for p, ns in g.items() for q in ns)


def test_small_rounds_get_the_complete_graph():
    g = graph.neighbours(["a", "b", "c", "d"], 8, b"x" * 16)
    assert g["a"] == {"b", "c", "d"}


@pytest.mark.parametrize("t,k", [(2, 4), (5, 4), (3, 5), (1, 0)])
def test_threshold_must_be_a_majority_of_neighbours(t, k):
    with pytest.raises(SecAggError):
        check_parameters(t, k)
    check_parameters(3, 4)
