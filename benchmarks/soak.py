"""Soak: many nodes, many rounds, nodes stopped and restarted at random; nothing lost or doubled.

Runs a FedAvg job (small MLP, quorum half the nodes, straggler policy `wait`: a round waits for
every node that is online, drops one that goes away, and takes it back when it returns) while
a chaos thread SIGKILLs or SIGTERMs a random node every few seconds and restarts it. At the end it prints rounds completed, updates lost (a (node, round) that a
node sent and that was acknowledged but is missing from the aggregator's record: must be 0)
and duplicate folds (a (node, round) folded twice: must be 0).

    python -m benchmarks.soak [--nodes 25] [--rounds 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter

from broker.local import LocalFederation
from common.identity import Identity
from common.logging import configure_logging
from common.messenger import Messenger
from common.settings import TransportSettings
from researcher.experiment import Experiment
from scripts import fmnist

NODE_ENV = {"FBM_NODE_RESEND_AFTER_S": "3", "FBM_MQTT_RECONNECT_MAX_S": "2"}


def chaos(fed: LocalFederation, names: list[str], stop: threading.Event, rng: random.Random, period_s: float) -> int:
    """Every `period_s`, stop a random running node (SIGKILL or SIGTERM) and restart it once it
    has exited, without waiting for that before the next fault."""
    busy: set[str] = set()
    lock = threading.Lock()
    faults = 0
    cycles: list[threading.Thread] = []

    def cycle(name: str, proc, sig: int) -> None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
        fed.start_node(name, env=NODE_ENV)
        with lock:
            busy.discard(name)

    while not stop.wait(period_s):
        with lock:
            free = [n for n in names if n not in busy]
            name = rng.choice(free) if free else None
            if name:
                busy.add(name)
        if name is None:
            continue
        proc = next(p for label, p in reversed(fed.procs) if label == f"node-{name}")
        worker = threading.Thread(target=cycle, args=(name, proc, rng.choice([signal.SIGKILL, signal.SIGTERM])))
        worker.start()
        cycles.append(worker)
        faults += 1
    for worker in cycles:  # every restarted node is registered before the federation stops
        worker.join()
    return faults


def acknowledged_updates(fed: LocalFederation, job: str) -> set[tuple[int, str]]:
    """(round, node) pairs the nodes sent, read from their logs (update_sent lines)."""
    sent = set()
    for log in (fed.root / "logs").glob("node-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"update_sent"' in line and job in line:
                entry = json.loads(line)
                sent.add((entry["round"], entry["node"]))
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--period", type=float, default=2.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging("warning")
    rng = random.Random(args.seed)
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", args.nodes)
        names = [f"site-{i:03d}" for i in range(args.nodes)]
        fed.add_nodes(fed.shard_datasets(names, shards), start=False)
        for name in names:
            fed.start_node(name, env=NODE_ENV)
        fed.add_aggregator("fedavg-1")
        fed.wait_online(set(names), timeout_s=600)
        exp = Experiment(fed.enroll("soak", "researcher"), plan="mlp", tags=["fmnist"], rounds=args.rounds,
                         quorum=max(1, args.nodes // 2), stragglers="wait", round_deadline_s=60, model_args={"hidden": [32]},
                         training_args={"epochs": 1, "lr": 0.05, "batch_size": 32})
        acked: set[tuple[int, str]] = set()
        observer = Messenger(Identity.load(fed.enroll("soak-observer", "admin")),
                             TransportSettings(clean_start=True, session_expiry_s=0), client_id="soak-observer")
        observer.subscribe("fbm/v1/nodes/+/requests", lambda m: acked.add((m.body.round, m.body.node)),
                           types={"update_received"})
        observer.connect()
        stop = threading.Event()
        result: dict[str, int] = {}
        chaos_thread = threading.Thread(target=lambda: result.update(faults=chaos(fed, names, stop, rng, args.period)))
        start = time.monotonic()
        with exp:
            job = exp.submit()
            chaos_thread.start()
            state = exp.watch(timeout_s=3600)
            stop.set()
            chaos_thread.join()
        wall = time.monotonic() - start
        observer.close()
        folded = Counter((h["round"], r["node"]) for h in state.history for r in h["reports"])
        duplicates = sum(c - 1 for c in folded.values() if c > 1)
        closed = {h["round"] for h in state.history}
        # the aggregator acknowledges an update only after folding it: an acknowledged update
        # missing from the record is a loss (an update sent for a round that closed at quorum
        # without it is a straggler, reported separately)
        lost = len(acked - set(folded))
        sent = acknowledged_updates(fed, job)
        print(f"\n{args.nodes} nodes, {args.rounds} rounds, a node stopped every {args.period:.0f}s "
              f"({result.get('faults', 0)} faults), {wall:.0f}s")
        print(f"status: {state.status} {state.reason}")
        print(f"rounds completed: {len(state.history)}/{args.rounds}")
        print(f"updates folded: {sum(folded.values())}; updates sent by nodes: {len(sent)}; "
              f"sent but folded in no round (their node left before the round closed, or it closed without them): {len({k for k in sent if k[0] in closed} - set(folded))}")
        print(f"updates acknowledged: {len(acked)}; lost (acknowledged but not in the aggregator's record): {lost}")
        print(f"duplicate folds: {duplicates}")
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


if __name__ == "__main__":
    main()
