"""Secure aggregation through the real broker at 10-100 sites, plain and secure in one run
(simulated sites, real aggregator process): `python -m benchmarks.secagg` prints `table`."""

from __future__ import annotations

import math
import os
import shutil
import time

from benchmarks.procs import timed_job
from benchmarks.secagg_e2e import FANOUT_TYPES, SITE_TYPES, Meter, cpu_s
from broker import process
from broker.local import LocalFederation
from node.simulation import SimulatedFleet
from researcher.experiment import Experiment

MODEL = {"in_features": 784, "hidden": [32], "n_classes": 10}
PARAMETERS = 784 * 32 + 32 + 32 * 10 + 10
TRAINING = {"epochs": 1, "lr": 0.05, "batch_size": 32}


def thread_cpu_s(tid: int) -> float:
    """CPU seconds of one thread of this process."""
    return cpu_s(os.getpid(), tid)


def secagg_option(n: int) -> dict:
    """k = 2 ceil(log2 n) neighbours (even, at most the complete graph), T = k/2 + 1."""
    k = min(2 * math.ceil(math.log2(n)), n - 1 + (n - 1) % 2)
    return {"threshold": k // 2 + 1, "neighbours": k, "clip": 1.0, "max_count": 10_000}


def job(fed: LocalFederation, fleet: SimulatedFleet, meter: Meter, n: int, rounds: int, secure: bool) -> dict:
    exp = Experiment(fed.enroll("sab-researcher", "researcher"), plan="mlp", tags=["sab"], rounds=rounds, quorum=n,
                     stragglers="wait", round_deadline_s=300, model_args=MODEL, training_args=TRAINING, seed=3,
                     aggregator_identity="agg-sab", secure_aggregation=secagg_option(n) if secure else None)
    agg = fed.process("agg-agg-sab").pid
    tid = fleet._thread.native_id or 0
    fleet_cpu0, agg_cpu0 = thread_cpu_s(tid), cpu_s(agg)
    with exp:
        state, wall = timed_job(exp)
    time.sleep(0.5)
    counted = meter.bytes[exp.job_id]
    sites = sum(v for t, v in counted.items() if t in SITE_TYPES) / rounds
    agg_out = sum(v for t, v in counted.items() if t in FANOUT_TYPES) / rounds
    later = [h["duration_s"] for h in state.history[1:]] or [state.history[0]["duration_s"]]
    return {"n": n, "mode": "secure" if secure else "plain", "round1_s": state.history[0]["duration_s"],
            "round_s": sum(later) / len(later), "site_kib": sites / n / 1024, "agg_kib": agg_out / 1024,
            "fanout_mib": agg_out * n / 2**20, "site_cpu_ms": 1000 * (thread_cpu_s(tid) - fleet_cpu0) / n / rounds,
            "agg_cpu_ms": 1000 * (cpu_s(agg) - agg_cpu0) / rounds, "k": secagg_option(n)["neighbours"] if secure else 0,
            "load": os.getloadavg()[0]}


def mean_of(runs: list[dict]) -> dict:
    """Each figure averaged over the runs of one mode (alternated with the other's in time)."""
    return {k: (sum(r[k] for r in runs) / len(runs) if isinstance(v, float) else v) for k, v in runs[0].items()}


def run(n: int, rounds: int, pairs: int) -> list[dict]:
    fed = LocalFederation().start()
    fleet = None
    try:
        bundles = fed.ws.enroll_many([f"sab-{i:03d}" for i in range(n)], "node")
        process.reload(fed.ws)
        fed.add_aggregator("agg-sab")
        meter = Meter(fed)  # connected before the fleet (paho's threaded loop uses select())
        fleet = SimulatedFleet(bundles, tag="sab", samples=32, features=784)
        fleet.start(timeout_s=600)
        time.sleep(2.0)  # the aggregator reads N retained statuses
        job(fed, fleet, meter, n, 2, True)  # warm-up, not counted: imports, first training steps
        runs = [job(fed, fleet, meter, n, rounds, secure) for _ in range(pairs) for secure in (False, True)]
        return [mean_of([r for r in runs if r["mode"] == mode]) for mode in ("plain", "secure")]
    finally:
        if fleet is not None:
            fleet.stop()
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def table(sizes: list[int], rounds: int, pairs: int) -> list[dict]:
    print(f"MLP 784-32-10 ({PARAMETERS} parameters), 32 synthetic samples a site, {rounds} rounds a job, {pairs} "
          f"plain/secure pair(s) alternated per N after a warm-up job, simulated sites, real TLS broker and "
          f"aggregator; load average before: {os.getloadavg()[0]:.2f}")
    print("| n | mode | k | round 1 (s) | later rounds (s) | secure / plain | site sends / round (KiB) | "
          "aggregator publishes / round (KiB) | broker -> sites / round (MiB) | CPU / site / round (ms) | "
          "aggregator CPU / round (ms) | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in sizes:
        plain, secure = run(n, rounds, pairs)
        for r in (plain, secure):
            ratio = r["round_s"] / plain["round_s"]
            print(f"| {n} | {r['mode']} | {r['k'] or '-'} | {r['round1_s']:.2f} | {r['round_s']:.3f} | {ratio:.2f}x | "
                  f"{r['site_kib']:.1f} | {r['agg_kib']:.1f} | {r['fanout_mib']:.2f} | {r['site_cpu_ms']:.1f} | "
                  f"{r['agg_cpu_ms']:.0f} | {r['load']:.1f} |", flush=True)
        rows += [plain, secure]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return rows
