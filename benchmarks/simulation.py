"""Simulated federations of 100 to 10,000 nodes through the real TLS broker, in one process.

Per N, in one run: enrol N node identities (bulk), start a real aggregator process, connect
every simulated node (own certificate, own MQTT connection and session; see node/simulation.py),
submit a tiny-model job (logistic regression, 10 features, 32 samples per node) and time its
rounds. Printed: connect time, mean round time (rounds after the first), the cost per node per
round, the process's RSS, and the CPU seconds per steady round of the fleet, the aggregator and
the broker (sampled from /proc/PID/stat over the steady rounds' wall-time window).

    python -m benchmarks.simulation [--nodes 100 1000 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from benchmarks.procs import CpuSampler, rss_bytes, timed_job
from broker import process
from broker.local import LocalFederation
from common.logging import configure_logging
from common.settings import TransportSettings
from node.simulation import SimulatedFleet
from researcher.experiment import Experiment


def run(n: int, rounds: int) -> dict:
    fed = LocalFederation().start()
    try:
        t0 = time.perf_counter()
        bundles = fed.ws.enroll_many([f"sim-{i:05d}" for i in range(n)], "node")
        process.reload(fed.ws)
        enrol_s = time.perf_counter() - t0
        fed.add_aggregator("agg-sim")
        researcher = fed.enroll("sim-researcher", "researcher")
        exp = Experiment(researcher, plan="logreg", tags=["sim"], rounds=rounds, quorum=n, stragglers="wait",
                         round_deadline_s=600, model_args={"in_features": 10, "n_classes": 2},
                         training_args={"epochs": 1, "lr": 0.1, "batch_size": 32}, aggregator_identity="agg-sim",
                         mqtt=TransportSettings(connect_timeout_s=600, publish_timeout_s=600))
        _ = exp.messenger  # connected first: paho's threaded loop uses select(), which fails on fds >= 1024
        fleet = SimulatedFleet(bundles)
        connect_s = fleet.start(timeout_s=1800)
        time.sleep(2.0 + n / 2000)  # the aggregator reads N retained statuses
        pids = {"fleet": os.getpid(), "aggregator": fed.process("agg-agg-sim").pid, "broker": process.read_pid(fed.ws)}
        with exp, CpuSampler(pids) as cpu:
            state, wall = timed_job(exp)
            ended = time.time()
        durations = [h["duration_s"] for h in state.history]
        steady = durations[1:] or durations
        round_s = sum(steady) / len(steady)
        # the steady rounds are the last ones before the job ended (their CPU per round, per process)
        used = cpu.between(ended - sum(steady), ended)
        cpu_round = {f"cpu_{k}_s": v / len(steady) for k, v in used.items()}
        fleet_rss_mb = rss_bytes(os.getpid()) / 2**20  # with N nodes connected (ru_maxrss would count earlier work)
        fleet.stop()
        return {"n": n, "enrol_s": enrol_s, "connect_s": connect_s, "first_round_s": durations[0], "round_s": round_s,
                "per_node_ms": 1000 * round_s / n, "wall_s": wall, "updates": fleet.updates_sent,
                "train_loss": state.history[-1]["metrics"].get("train_loss", float("nan")),
                "fleet_rss_mb": fleet_rss_mb, **cpu_round, "load_avg": os.getloadavg()[0]}
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def measure(ns: list[int], rounds: int) -> list[dict]:
    rows = []
    for n in ns:
        try:
            rows.append(run(n, rounds))
        except Exception as exc:  # noqa: BLE001 - the sizes measured so far still count
            rows.append({"n": n, "failed": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
            break
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    rows = measure(args.nodes, args.rounds)
    print(f"\ntiny model (logistic regression, 10 features), 32 samples per node, {args.rounds} rounds, real TLS broker")
    print("CPU s a steady round: fleet / aggregator / broker (from /proc/PID/stat)")
    print(f"{'N':>6} {'connect s':>10} {'1st round s':>12} {'round s':>8} {'ms/node/round':>14} {'fleet RSS MB':>13} "
          f"{'CPU fleet/agg/broker s':>23} {'load':>5}")
    for r in rows:
        if "failed" in r:
            print(f"{r['n']:>6} failed: {r['failed']}")
            continue
        split = f"{r['cpu_fleet_s']:.2f}/{r['cpu_aggregator_s']:.2f}/{r['cpu_broker_s']:.2f}"
        print(f"{r['n']:>6} {r['connect_s']:>10.1f} {r['first_round_s']:>12.2f} {r['round_s']:>8.2f} "
              f"{r['per_node_ms']:>14.2f} {r['fleet_rss_mb']:>13.0f} {split:>23} {r['load_avg']:>5.1f}")


if __name__ == "__main__":
    main()
