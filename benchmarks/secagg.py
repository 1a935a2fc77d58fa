"""Cost of secure aggregation per site and at the server, against a plain sum, in one run.

    PYTHONPATH=. python -m benchmarks.secagg [--dim 10000] [--sizes 10 25 100]

The pure protocol (common/secagg) in memory: CPU seconds (process time) and payload bytes a
site sends over the four stages, the server's CPU, for the SecAgg+ graph (k ~ 2 log2 n) and,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=10_000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 100])
    args = ap.parse_args()
    cols = ("n", "k", "T", "drop", "site_cpu_ms", "site_kib", "server_cpu_ms", "plain_site_kib",
            "plain_server_cpu_ms", "max_err", "bound")
    print(f"dim={args.dim} (float64 in, uint32 on the wire); 10% of sites drop before their masked input")
    print(" | ".join(cols))
    for n in args.sizes:
        for complete in (False, True):
            row = measure(n, args.dim, complete, drop=n // 10)
            print(" | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols))


if __name__ == "__main__":
    main()
