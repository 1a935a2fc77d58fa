"""What the server's full view of a round reveals: masked vectors look uniform, fewer than T
shares do not unmask, and a late input from a site declared dropped stays hidden.

Uniformity is tested on the high and low bytes of 20 000 coordinates (chi-square, 255 degrees
of freedom) and on the whole value (Kolmogorov-Smirnov against U[0, 2^32)), at alpha = 1e-4:
critical values 347.65 (chi2.ppf(1 - 1e-4, 255)) and 2.2253 / sqrt(N) (Kolmogorov). Each test
also shows the statistic rejects the unmasked encoding, so it could fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import shamir
from common.secagg.encoding import ring_sub
from common.secagg.keys import KeyPair
from common.secagg.masks import pair_seed, pairwise_mask, self_mask
from common.secagg.server import Deadlines, Ignored, ServerSecAgg
from common.secagg.simulate import run_round
from common.secagg.site import share_index
from common.secagg.stages import MaskedInput, Stage, UnmaskShares
from tests.unit.secagg_helpers import SITES, config, inputs

DIM = 20_000
CHI2_CRIT = 347.65
KS_CRIT = 2.2253


def chi2_byte(v: np.ndarray, shift: int) -> float:
    counts = np.bincount(((v >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.int64), minlength=256)
    expected = v.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def ks_uniform(v: np.ndarray) -> float:
    """sqrt(N) * sup |F_empirical - F_uniform| for v / 2^32."""
    u = np.sort(v.astype(np.float64) / 2**32)
    n = u.size
    d = max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max())
    return float(np.sqrt(n) * d)


def looks_uniform(v: np.ndarray) -> bool:
    return chi2_byte(v, 24) < CHI2_CRIT and chi2_byte(v, 0) < CHI2_CRIT and ks_uniform(v) < KS_CRIT


@pytest.fixture(scope="module")
def round_log():
    cfg, data = config(dim=DIM), inputs(dim=DIM)
    data["site00"] = (np.full(DIM, 0.5), 10_000)  # a constant input: as far from uniform as it gets
    return cfg, data, run_round(cfg, data, {"site07": "before_masked"})


def test_the_statistics_reject_an_unmasked_input(round_log):
    cfg, data, _ = round_log
    plain = cfg.encoding.encode(*data["site00"])[:-1]
    noisy = cfg.encoding.encode(*data["site01"])[:-1]
    assert not looks_uniform(plain) and not looks_uniform(noisy)


def test_a_masked_vector_is_indistinguishable_from_uniform(round_log):
    _, _, log = round_log
    y = next(m.vector for s, m in log.view if s == "site00" and isinstance(m, MaskedInput))[:-1]
    print(f"chi2 high={chi2_byte(y, 24):.1f} low={chi2_byte(y, 0):.1f} ks={ks_uniform(y):.3f}")
    assert looks_uniform(y)


def test_even_without_its_self_mask_a_survivor_stays_hidden(round_log):
    """The server learns b_u of every survivor; the pairwise masks still hide x_u."""
    cfg, _, log = round_log
    y = next(m.vector for s, m in log.view if s == "site00" and isinstance(m, MaskedInput))
    holders = [(s, m) for s, m in log.view if isinstance(m, UnmaskShares) and "site00" in m.b_shares]
    participants = sorted(log.states[1].keys)
    shares = [shamir.Share.from_bytes(share_index(participants, s), m.b_shares["site00"]) for s, m in holders]
    b = shamir.reconstruct(shares, cfg.threshold)
    assert looks_uniform(ring_sub(y, self_mask(b, y.size))[:-1])


def _colluders_s_shares(log, target: str, how_many: int) -> list[shamir.Share]:
    """What `how_many` colluding neighbours of `target` hold of its mask key."""
    holders = [s for s, site in sorted(log.sites.items()) if target in site._held][:how_many]
    return [log.sites[s]._held[target][1] for s in holders]


def test_fewer_than_t_shares_do_not_unmask_a_single_site(round_log):
    cfg, _, log = round_log
    t, key = cfg.threshold, log.sites["site00"]._s.private_bytes()
    few = _colluders_s_shares(log, "site00", t - 1)
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct(few, t)
    assert shamir.interpolate_at_zero(few) != int.from_bytes(key, "big")
    assert shamir.reconstruct(_colluders_s_shares(log, "site00", t), t) == key  # T do


def test_a_late_input_from_a_dropped_site_reveals_nothing(round_log):
    """site07 was declared dropped before its masked input: its s_sk is reconstructed (to
    cancel its neighbours' masks) but its b_u never is, so its late input stays masked."""
    cfg, _, log = round_log
    masked_state = next(s for s in log.states if s.stage is Stage.MASKED)
    late = log.sites["site07"].on_state(masked_state)
    server = ServerSecAgg(cfg, SITES, Deadlines(1, 2, 3, 4))
    server.state = next(s for s in log.states if s.stage is Stage.UNMASK)
    assert isinstance(server.receive("site07", late, 9.0)[0], Ignored)
    answers = [m for _, m in log.view if isinstance(m, UnmaskShares)]
    assert not any("site07" in m.b_shares for m in answers)  # no share of b_07 ever sent
    participants = sorted(masked_state.keys)
    s_shares = [shamir.Share.from_bytes(share_index(participants, s), m.s_shares["site07"])
                for s, m in log.view if isinstance(m, UnmaskShares) and "site07" in m.s_shares]
    s07 = KeyPair.from_private_bytes(shamir.reconstruct(s_shares, cfg.threshold))
    y = late.vector
    for v in sorted(set(masked_state.share_senders) & log.sites["site07"]._neighbours):
        seed = pair_seed(cfg.context, s07, "site07", masked_state.keys[v].s_pk, v)
        y = ring_sub(y, pairwise_mask(seed, "site07", v, y.size))
    assert looks_uniform(y[:-1])  # x_07 + PRG(b_07): still uniform
