"""Cost of secure aggregation, with and without it in the same run.

    PYTHONPATH=. python -m benchmarks.secagg [--sizes 10 25 100] [--rounds 4]    # through the broker
    PYTHONPATH=. python -m benchmarks.secagg --pure [--dim 10000] [--sizes 10 25 100]

Through the broker (the default): per N, one federation (TLS Mosquitto, a real aggregator
process) and N simulated sites (node/simulation.py: each its own identity, connection and
`SecureRounds`; training serial in one process), the same FedAvg job plain then secure (MLP
784-32-10, 25 450 parameters, k = 2 ceil(log2 N), T = k/2 + 1). Per job: wall time per round
(the aggregator's round duration, rounds after the first), bytes published per round (by the
sites; by the aggregator, which the broker fans out to every site), CPU per site per round (the
fleet's loop thread: messaging, training, masking) and the aggregator's CPU per round.

`--pure`: the protocol (common/secagg) in memory: CPU seconds (process time) and payload bytes
a site sends over the four stages, the server's CPU, for the SecAgg+ graph (k ~ 2 log2 n) and,
for comparison, the complete graph (plain SecAgg); the plain sum is float32 vectors added up.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from common.secagg.config import SecAggConfig
from common.secagg.encoding import Encoding
from common.secagg.simulate import run_round


def _params(n: int, complete: bool) -> tuple[int, int]:
    """(T, k): k = 2 ceil(log2 n) neighbours (or all), T just above k/2."""
    k = n - 1 + (n - 1) % 2 if complete else min(2 * math.ceil(math.log2(n)), n - 1 + (n - 1) % 2)
    return k // 2 + 1, k


def _plain(n: int, dim: int, data: list[np.ndarray]) -> tuple[float, int]:
    t0 = time.process_time()
    total = np.zeros(dim, np.float32)
    for v in data:
        total += v
    return time.process_time() - t0, dim * 4


def measure(n: int, dim: int, complete: bool, drop: int) -> dict[str, float]:
    t, k = _params(n, complete)
    cfg = SecAggConfig("bench", 1, t, k, Encoding(1.0, n, 10_000), dim, b"benchmark-round-seed")
    rng = np.random.default_rng(0)
    inputs = {f"site{i:03d}": (rng.normal(0, 0.1, dim), 100) for i in range(n)}
    drops = {f"site{i:03d}": "before_masked" for i in range(drop)}
    log = run_round(cfg, inputs, drops)
    assert log.result is not None, log.failure
    alive = [s for s in inputs if s not in drops]
    err = np.abs(log.result.weighted_sum - sum(100 * inputs[s][0] for s in alive)).max()
    plain_cpu, plain_bytes = _plain(n, dim, [inputs[s][0].astype(np.float32) for s in alive])
    return {"n": n, "k": k, "T": t, "drop": drop,
            "site_cpu_ms": 1e3 * float(np.mean([log.site_cpu_s[s] for s in alive])),
            "site_kib": float(np.mean([log.site_bytes_out[s] for s in alive])) / 1024,
            "server_cpu_ms": 1e3 * log.server_cpu_s,
            "plain_site_kib": plain_bytes / 1024, "plain_server_cpu_ms": 1e3 * plain_cpu,
            "max_err": float(err), "bound": cfg.encoding.sum_error_bound(len(alive))}


def pure_table(sizes: list[int], dim: int) -> None:
    cols = ("n", "k", "T", "drop", "site_cpu_ms", "site_kib", "server_cpu_ms", "plain_site_kib",
            "plain_server_cpu_ms", "max_err", "bound")
    print(f"dim={dim} (float64 in, uint32 on the wire); 10% of sites drop before their masked input")
    print(" | ".join(cols))
    for n in sizes:
        for complete in (False, True):
            row = measure(n, dim, complete, drop=n // 10)
            print(" | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pure", action="store_true", help="the protocol in memory, no broker")
    ap.add_argument("--dim", type=int, default=10_000, help="--pure: coordinates")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 100])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2, help="plain/secure jobs alternated per N")
    args = ap.parse_args()
    if args.pure:
        pure_table(args.sizes, args.dim)
        return
    from benchmarks.secagg_broker import table
    from common.logging import configure_logging

    configure_logging("warning")
    table(args.sizes, args.rounds, args.pairs)


if __name__ == "__main__":
    main()
