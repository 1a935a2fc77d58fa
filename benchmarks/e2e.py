"""End-to-end overhead: a real federation vs the same local epochs in one plain torch loop.

Workload (the issue's): N nodes (10 and 25), R rounds, MLP 784-128-10, batch 64, SGD lr 0.01,
1 local epoch per round, IID Fashion-MNIST shards. Printed per N, all from this one run:
node start-up time (all nodes connected; the aggregator, started after them, online), the time until every node's training process is warm
(a site's node runs for days: jobs meet warm nodes), job wall time (submit -> done), pure compute (the same N x R local epochs,
sequential, 1 thread, no federation), their ratio, per-round overhead, peak RSS of every
process of the federation (broker, nodes and their training children, aggregator), and the
final model's test accuracy. With `--seal both` (the default) each N runs twice, jobs, models
and updates sealed end to end (the product's default, issue 18) and in clear
(FBM_MQTT_SEAL=false for every process), so the cost of encryption is in one run. `--template`
says where training processes are forked from: one template shared by the host's nodes
(`fbm-node template`, the default of LocalFederation) or one per node (a site's own).

    python -m benchmarks.e2e [--nodes 10 25] [--rounds 5] [--seal both|on|off] [--template shared|per-node|both]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.procs import PeakRSS, format_breakdown, timed_job
from broker import process
from broker.local import LocalFederation
from common.logging import configure_logging
from common.training.zoo import MLP
from researcher.experiment import Experiment
from scripts import fmnist

MODEL_ARGS = {"in_features": 784, "hidden": [128], "n_classes": 10}
TRAINING_ARGS = {"epochs": 1, "lr": 0.01, "batch_size": 64}


def _warm_up(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One untimed step: a process's first optimizer pays torch's lazy imports (~0.9 s here),
    which the nodes pay in their training template before any job, off the job's clock."""
    opt = torch.optim.SGD(model.parameters(), lr=TRAINING_ARGS["lr"])
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:TRAINING_ARGS["batch_size"]]), y[:TRAINING_ARGS["batch_size"]]).backward()
    opt.step()


def pure_compute(shards, rounds: int) -> float:
    """Seconds for the same local epochs in one plain torch loop (what the nodes compute), warm:
    without the one-time imports of a process's first step, as in the federation."""
    torch.set_num_threads(1)
    data = []
    for path in shards:
        with np.load(path) as z:
            data.append((torch.from_numpy(z["x"][:, None].astype(np.float32) / 255.0), torch.from_numpy(z["y"])))
    torch.manual_seed(0)
    model = MLP(**MODEL_ARGS)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _warm_up(model, *data[0])
    start = time.perf_counter()
    for _ in range(rounds):
        for x, y in data:
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=TRAINING_ARGS["lr"])
            for idx in torch.randperm(len(x)).split(TRAINING_ARGS["batch_size"]):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return time.perf_counter() - start


def wait_ready(fed: LocalFederation, names: list[str], timeout_s: float = 600) -> None:
    """Until every node's audit trail says its training process is up (`training_ready`)."""
    from node.audit import AuditTrail
    from node.db import Database

    trails = [AuditTrail(Database(fed.root / "nodes" / name / "node.db")) for name in names]
    deadline = time.monotonic() + timeout_s
    while not all(any(e["event"] == "training_ready" for e in t.entries(limit=20)) for t in trails):
        if time.monotonic() > deadline:
            raise TimeoutError("training processes not ready")
        time.sleep(0.5)


def run(n: int, rounds: int, sealed: bool = True, shared: bool = True) -> dict[str, float]:
    """One federation of `n` nodes and one job; `sealed` False turns end-to-end sealing off in
    every process it starts (and in the researcher here); `shared` False: a template per node."""
    saved = os.environ.get("FBM_MQTT_SEAL")
    os.environ["FBM_MQTT_SEAL"] = "true" if sealed else "false"
    try:
        return {**_run(n, rounds, shared), "sealed": float(sealed), "shared_template": float(shared)}
    finally:
        if saved is None:
            os.environ.pop("FBM_MQTT_SEAL", None)
        else:
            os.environ["FBM_MQTT_SEAL"] = saved


def _run(n: int, rounds: int, shared: bool) -> dict[str, float]:
    fed = LocalFederation(shared_template=shared).start()
    try:
        shards = fmnist.write_shards(fed.root / "data", n)
        names = [f"site-{i:03d}" for i in range(n)]
        fed.add_nodes(fed.shard_datasets(names, shards), start=False)  # folders and datasets, not timed
        bundle = fed.enroll("bench", "researcher")
        broker_pid = process.read_pid(fed.ws)
        with PeakRSS(lambda: [broker_pid, *(p.pid for _, p in fed.procs)]) as rss:
            t0 = time.perf_counter()
            for name in names:
                fed.start_node(name)
            fed.add_aggregator("fedavg-1")
            fed.wait_online(set(names), timeout_s=600, aggregators=False)
            startup = time.perf_counter() - t0  # the nodes (the row's target); the aggregator next
            fed.wait_online(set(names), timeout_s=600)
            aggregator_online = time.perf_counter() - t0
            wait_ready(fed, names)  # long-running nodes: their training process is warm before a job
            ready = time.perf_counter() - t0
            exp = Experiment(bundle, plan="mlp", tags=["fmnist"], rounds=rounds, quorum=n, model_args=MODEL_ARGS,
                             training_args=TRAINING_ARGS, round_deadline_s=600)
            with exp:
                state, wall = timed_job(exp)
                x, y = fmnist.test_tensors()
                acc = fmnist.accuracy(exp.model(), x, y)
        node_train = sum(r["timings"]["train_s"] for h in state.history for r in h["reports"])
        fed.stop()
        compute = pure_compute(shards, rounds)
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)
    return {"n": n, "startup_s": startup, "aggregator_online_s": aggregator_online, "ready_s": ready, "wall_s": wall, "compute_s": compute, "ratio": wall / compute,
            "overhead_per_round_s": (wall - compute) / rounds, "node_train_sum_s": node_train,
            "peak_rss_gb": rss.peak / 1e9, "peak_pss_gb": rss.peak_pss / 1e9, "accuracy": acc, "pss_parts": rss.peak_parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seal", choices=["both", "on", "off"], default="both")
    parser.add_argument("--template", choices=["shared", "per-node", "both"], default="shared",
                        help="training processes forked from one template for the host, or one per node")
    args = parser.parse_args()
    configure_logging("warning")
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.seal]
    templates = {"both": [True, False], "shared": [True], "per-node": [False]}[args.template]
    rows = []
    for n in args.nodes:
        for sealed, shared in ((s, t) for s in modes for t in templates):
            print(f"-- {n} nodes, sealed {sealed}, template: {'shared by the host' if shared else 'one per node'}", flush=True)
            rows.append(run(n, args.rounds, sealed, shared))
            print({k: round(v, 3) for k, v in rows[-1].items() if k != "pss_parts"}, flush=True)
            print(f"peak PSS by role ({n} nodes):\n{format_breakdown(rows[-1]['pss_parts'])}", flush=True)
    print(f"\nMLP 784-128-10, batch 64, SGD lr 0.01, 1 epoch/round, {args.rounds} rounds, IID Fashion-MNIST shards")
    print(f"{'N':>4} {'template':>9} {'sealed':>6} {'start s':>8} {'ready s':>8} {'wall s':>8} {'compute s':>10} {'wall/compute':>13} {'overhead/round s':>17} "
          f"{'sum node train s':>17} {'peak RSS GB':>12} {'peak PSS GB':>12} {'accuracy':>9}")
    for r in rows:
        print(f"{r['n']:>4} {'shared' if r['shared_template'] else 'per-node':>9} {'yes' if r['sealed'] else 'no':>6} {r['startup_s']:>8.1f} {r['ready_s']:>8.1f} {r['wall_s']:>8.1f} {r['compute_s']:>10.1f} {r['ratio']:>12.2f}x "
              f"{r['overhead_per_round_s']:>17.2f} {r['node_train_sum_s']:>17.1f} {r['peak_rss_gb']:>12.2f} {r['peak_pss_gb']:>12.2f} {r['accuracy']:>9.4f}")


if __name__ == "__main__":
    main()
