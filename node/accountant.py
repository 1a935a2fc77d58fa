"""Privacy accounting: the (epsilon, delta) a job spends on a dataset, from the mechanism run.

Renyi DP (Mironov, CSF 2017) of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019)
at integer orders, composed over the job's steps and converted to (epsilon, delta) with the
conversion of Balle et al. 2020 (the one Opacus' RDP accountant uses; the tests check that both
give the same epsilon). Client-level DP as fedbiomq's nodes run it is the case q = 1: the site
takes part in every round and its whole update is clipped and noised once a round.

Sample-level DP-SGD (Opacus in the training process) is the sampled Gaussian mechanism at
q = batch_size / rows with Poisson sampling, `dp_sgd_schedule` steps a round, over the rounds.

Pure Python and numpy: the node process decides with it before any training starts.
"""

from __future__ import annotations

import math

import numpy as np

from common.training.catalog import dp_sgd_schedule, train_rows
from node.policy import JobAsk, schedule_args

ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 256)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def rdp_sampled_gaussian(q: float, sigma: float, order: int) -> float:
    """RDP at integer `order` of one step: sampling rate q, noise multiplier sigma.

    log A / (order - 1), A = sum_k C(order, k) (1 - q)^(order - k) q^k exp((k^2 - k) / (2 sigma^2)).
    """
    if sigma <= 0:
        return math.inf
    if q == 0:
        return 0.0
    if q == 1.0:
        return order / (2 * sigma**2)
    log_a = -math.inf
    for k in range(order + 1):
        log_binom = math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        term = log_binom + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a / (order - 1)


def epsilon(q: float, sigma: float, steps: int, delta: float, orders: tuple[int, ...] = ORDERS) -> float:
    """The smallest epsilon over `orders` of `steps` compositions at `delta`."""
    if steps <= 0:
        return 0.0
    best = math.inf
    for order in orders:
        rdp = steps * rdp_sampled_gaussian(q, sigma, order)
        eps = rdp + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)
        best = min(best, eps)
    return float(np.maximum(best, 0.0))


def client_level_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """A job's spend under client-level DP: one Gaussian release of the site's update a round."""
    return epsilon(1.0, sigma, rounds, delta)


def job_epsilon(ask: JobAsk, dataset_rows: int, delta: float) -> float:
    """What a DP job spends on a dataset of `dataset_rows` (0.0 for a job without DP)."""
    if ask.dp_sigma is None:
        return 0.0
    if ask.dp_mode == "sample":
        q, per_round = dp_sgd_schedule(train_rows(dataset_rows, schedule_args(ask)), schedule_args(ask))
        return epsilon(q, ask.dp_sigma, per_round * ask.rounds, delta)
    return client_level_epsilon(ask.dp_sigma, ask.rounds, delta)
