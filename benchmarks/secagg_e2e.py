"""Secure aggregation through the real broker: the same FedAvg job with and without it.

Per N real node processes (5 and 10), one federation, two jobs (plain, then secure; same seeds):
wall time per round (the aggregator's round duration), bytes published per round (by the sites:
updates or their four secure-aggregation messages; by the aggregator: the model and, secure, the
retained stage states, which the broker fans out to every node), and per-site CPU of the node
process (messaging, masking; its training child does the same work in both jobs).

    PYTHONPATH=. python -m benchmarks.secagg_e2e [--nodes 5 10] [--rounds 4]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

from broker.local import LocalFederation
from common.envelope import peek_header
from common.errors import BadMessage
from common.identity import Identity
from common.settings import TransportSettings
from common.transport import Transport
from researcher.experiment import Experiment
from scripts import fmnist

MODEL = {"in_features": 784, "hidden": [32], "n_classes": 10}
TRAINING = {"epochs": 1, "lr": 0.05, "batch_size": 50}
TICK = 100.0  # clock ticks a second (os.sysconf("SC_CLK_TCK") on Linux)
SITE_TYPES = {"update", "secagg_keys", "secagg_shares", "secagg_masked", "secagg_unmask"}
FANOUT_TYPES = {"model", "secagg_state"}  # retained, read by every node


def cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a process, or of one of its threads."""
    try:
        path = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
        fields = path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


class Meter:
    """An admin identity counting the signed bytes of every message of the job, by type. It
    reads the envelope's header only: bodies are sealed for their recipients (issue 18)."""

    def __init__(self, fed: LocalFederation) -> None:
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._lock = threading.Lock()
        self.m = Transport(Identity.load(fed.enroll("bench-meter", "admin")),
                           TransportSettings(clean_start=True, session_expiry_s=0), client_id="bench-meter",
                           on_delivery=self._count)
        self.m.connect()
        for f in ("fbm/v1/jobs/+/+/secagg/+", "fbm/v1/jobs/+/+/secagg", "fbm/v1/jobs/+/+/updates/+", "fbm/v1/jobs/+/+/model",
                  "fbm/v1/nodes/+/requests"):
            self.m.subscribe(f, retained_chunks=True)

    def _count(self, delivery) -> None:
        if delivery.retained or not delivery.payload:  # an earlier job's retained copy
            return
        try:
            header = peek_header(delivery.payload)
        except BadMessage:
            return
        with self._lock:
            self.bytes[header.get("job") or ""][header.get("type")] += len(delivery.payload)


def job(fed: LocalFederation, n: int, rounds: int, secure: bool, meter: Meter, names: list[str]) -> dict[str, float]:
    k = 4 if n <= 5 else 8
    exp = Experiment(Identity.load(fed.ws.bundle_dir("bench")), plan="mlp", tags=["fmnist"], rounds=rounds, quorum=n,
                     round_deadline_s=120, model_args=MODEL, training_args=TRAINING, seed=3,
                     secure_aggregation={"threshold": k // 2 + 1, "neighbours": k, "clip": 1.0, "max_count": 10_000}
                     if secure else None)
    nodes = [fed.process(f"node-{s}").pid for s in names]
    before = {p: cpu_s(p) for p in nodes}
    exp.submit()
    state = exp.watch(timeout_s=900, progress=False)
    exp.close()
    assert state.status == "done", state.reason
    time.sleep(0.5)
    node_cpu = sum(cpu_s(p) - before[p] for p in nodes) / n / rounds  # its training child: the same work
    counted = meter.bytes[exp.job_id]
    site = sum(v for t, v in counted.items() if t in SITE_TYPES) / rounds
    agg = sum(v for t, v in counted.items() if t in FANOUT_TYPES) / rounds
    acks = counted.get("update_received", 0) / rounds
    warm = [h["duration_s"] for h in state.history[1:]]  # round 1 includes starting the job's training process
    return {"round1_s": state.history[0]["duration_s"], "round_s": sum(warm) / max(len(warm), 1), "site_kib": site / n / 1024,
            "sites_kib": site / 1024, "agg_kib": agg / 1024, "fanout_kib": (agg * n + acks) / 1024,
            "node_cpu_ms": 1000 * node_cpu}


def run(n: int, rounds: int) -> list[tuple[str, dict[str, float]]]:
    fed = LocalFederation().start()
    try:
        names = [f"site-{i:02d}" for i in range(n)]
        fed.add_nodes(fed.shard_datasets(names, fmnist.write_shards(fed.root / "data", n, limit=300 * n, seed=2)))
        fed.add_aggregator("agg")
        fed.enroll("bench", "researcher")
        fed.wait_online(set(names))
        meter = Meter(fed)
        time.sleep(5)  # training processes warm
        return [(mode, job(fed, n, rounds, mode == "secure", meter, names)) for mode in ("plain", "secure")]
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    print(f"MLP 784-32-10 ({784 * 32 + 32 + 32 * 10 + 10} parameters), 300 samples a site, {args.rounds} rounds")
    print("| n | mode | round 1 (s) | later rounds (s) | site sends / round (KiB) | aggregator publishes / round (KiB) | "
          "broker -> nodes / round (KiB) | node process CPU / site / round (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.nodes:
        for mode, r in run(n, args.rounds):
            print(f"| {n} | {mode} | {r['round1_s']:.2f} | {r['round_s']:.3f} | {r['site_kib']:.1f} | {r['agg_kib']:.1f} | "
                  f"{r['fanout_kib']:.0f} | {r['node_cpu_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
