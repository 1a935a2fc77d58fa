"""Aggregation memory: peak RSS while folding N updates of a 10 MB model, whatever N.

Each N runs in a fresh process and takes the aggregator's own path for every update: the
signed envelope as it arrives off the wire (bytes), `open_envelope` (signature check, decode),
`check_update`, `rule.add`; then `end_round`. Updates are made one at a time, as a stream of
arrivals would be. Printed: the peak above the process's baseline (torch loaded, the global
model and one update's worth of buffers allocated), in MB and in model sizes.

    python -m benchmarks.aggregation_memory [--n 10 100 1000] [--rule fedavg]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL_MB = 10


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fold(n: int, rule_name: str, policy: bool = True) -> dict:
    """Child process: fold `n` updates, report the peak RSS above the baseline."""
    import torch

    from common.memory import release_large_buffers_to_os

    if policy:
        release_large_buffers_to_os()  # what the aggregator service does at start

    from aggregators.rules import get_rule
    from aggregators.service import check_update
    from broker.local import free_port
    from broker.workspace import Workspace
    from common.envelope import open_envelope, seal
    from common.identity import Identity, TrustStore
    from common.messages import Update

    ws = Workspace(Path(tempfile.mkdtemp()) / "fed")
    ws.init("mem", port=free_port(), bind="127.0.0.1")
    node = Identity.load(ws.enroll("node-1", "node"))
    trust = TrustStore(node.ca_pem)
    numel = MODEL_MB * 1024 * 1024 // 4
    shapes = {"layer1.weight": (numel // 2,), "layer2.weight": (numel // 4,), "layer3.weight": (numel - numel // 2 - numel // 4,)}
    global_params = {k: torch.zeros(s) for k, s in shapes.items()}
    rule = get_rule(rule_name, {"max_updates": max(n, 1000)} if rule_name in ("fedmedian", "trimmedmean", "krum") else {})
    rule.begin_round(global_params)
    gen = torch.Generator().manual_seed(0)

    def arrival(i: int) -> bytes:
        params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        return seal(node, "update", Update(round=1, params=params, n_samples=10 + i), job="j", round_=1)[1]

    # warm-up: one update's worth of buffers (wire bytes, decoded tensors) is the baseline
    msg = open_envelope(arrival(0), trust)
    del msg
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for i in range(n):
        msg = open_envelope(arrival(i), trust)
        problem = check_update(msg.body.params, global_params)
        assert problem is None, problem
        rule.add(msg.body.params, msg.body.n_samples, f"node-{i}", {})
        del msg
    result = rule.end_round()
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    assert set(result) == set(shapes)
    extra = peak[0] - base
    return {"n": n, "rule": rule_name, "malloc_policy": policy, "peak_above_base_mb": extra / 1e6, "model_sizes": extra / (MODEL_MB * 1024 * 1024),
            "seconds": elapsed}


def measure(ns: list[int], rule: str = "fedavg", policy: bool = True) -> list[dict]:
    rows = []
    for n in ns:
        out = subprocess.run([sys.executable, "-m", "benchmarks.aggregation_memory", "--child", str(n), rule, str(int(policy))],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(fold(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rule", default="fedavg")
    parser.add_argument("--no-malloc-policy", action="store_true", help="measure without common.memory's fix")
    args = parser.parse_args()
    rows = measure(args.n, args.rule, not args.no_malloc_policy)
    print(f"\n{MODEL_MB} MB model, rule {args.rule}")
    print(f"{'N':>6} {'peak above baseline MB':>23} {'in model sizes':>15} {'fold s':>8}")
    for r in rows:
        print(f"{r['n']:>6} {r['peak_above_base_mb']:>23.1f} {r['model_sizes']:>15.2f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
