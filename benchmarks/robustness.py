"""Robust aggregation under attack: 10 nodes, 2 of them send poisoned updates.

The two attackers hold valid node certificates and run modified node software: they train
honestly on their shard, then send `global + scale * (local - global)` (scale -5: sign-flipped
and scaled). Everything else is real: TLS broker, 8 honest node processes, the aggregator
process, the researcher's Experiment. One job per rule on the same federation; the final
model's accuracy on the 10,000 Fashion-MNIST test images is printed per rule, next to FedAvg
without attackers.

    python -m benchmarks.robustness [--rounds 5] [--scale -5]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import torch

from broker.local import LocalFederation
from common import topics
from common.envelope import Message
from common.identity import Identity
from common.logging import configure_logging
from common.messages import DatasetInfo, JobSpec, NodeStatus
from common.messenger import Messenger
from common.settings import TransportSettings
from common.training.loader import load_plan_class
from node import datasets
from node.worker import to_arrays, to_tensors, train
from researcher.experiment import Experiment
from scripts import fmnist

MODEL_ARGS = {"in_features": 784, "hidden": [64], "n_classes": 10}
NODES, ATTACKERS = 10, 2


class RogueNode:
    """A node identity whose software poisons its updates (the attack, not a fedbiomq feature)."""

    def __init__(self, fed: LocalFederation, name: str, shard: Path) -> None:
        self.name = name
        self.scale = 1.0  # 1: honest; set per job
        self.data = datasets.load("npz", shard)
        self.jobs: dict[str, JobSpec] = {}
        self.done: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        identity = Identity.load(fed.enroll(name, "node"))
        self.m = Messenger(identity, TransportSettings(clean_start=True, session_expiry_s=0),
                           will=(topics.status(name), "node_status", NodeStatus(state="offline")))
        self.m.subscribe(topics.every("job"), self._on_job, types={"job"}, retained_chunks=True, qos=0)
        self.m.subscribe(topics.every("model"), self._on_model, types={"model"}, retained_chunks=True, qos=0)
        self.m.connect()
        info = DatasetInfo(name="fm", tags=["fmnist"], type="npz", n_samples=len(self.data), shape=[1, 28, 28])
        self.m.send(topics.status(name), "node_status", NodeStatus(state="online", datasets=[info]), retain=True)

    def _on_job(self, msg: Message) -> None:
        with self.lock:
            self.jobs[msg.body.job_id] = msg.body

    def _on_model(self, msg: Message) -> None:
        job = topics.job_of(msg.topic)
        model = msg.body
        with self.lock:
            spec = self.jobs.get(job or "")
            key = (job, model.open_round)
            if spec is None or model.status != "running" or model.open_round is None or key in self.done:
                return
            self.done.add(key)
        threading.Thread(target=self._attack, args=(spec, model), daemon=True).start()

    def _attack(self, spec: JobSpec, model) -> None:
        task = {"job": spec.job_id, "round": model.open_round, "plan": spec.plan.model_dump(), "model_args": spec.model_args,
                "training_args": spec.training_args, "params": to_arrays(model.params)}
        result = train(task, self.data, load_plan_class(spec.plan))
        local = to_tensors(result["params"])
        poisoned = {k: (model.params[k] + self.scale * (local[k] - model.params[k])).to(model.params[k].dtype)
                    for k in local}
        self.m.send(topics.update(spec.owner, spec.job_id, self.name), "update",
                    {"round": model.open_round, "params": poisoned, "n_samples": result["n_samples"],
                     "metrics": result["metrics"], "timings": result["timings"], "dataset": "fm"},
                    job=spec.job_id, round_=model.open_round)

    def close(self) -> None:
        self.m.close()


def run_job(fed: LocalFederation, rule: str, args: dict, rounds: int) -> float:
    exp = Experiment(Identity.load(fed.ws.bundle_dir("bench")), plan="mlp", tags=["fmnist"], rounds=rounds,
                     quorum=NODES, model_args=MODEL_ARGS, aggregator=rule, aggregator_args=args,
                     training_args={"epochs": 1, "lr": 0.05, "batch_size": 32}, seed=1, round_deadline_s=300)
    with exp:
        exp.submit()
        state = exp.watch(timeout_s=1800, progress=False)
        if state.status != "done":
            raise RuntimeError(f"{rule}: {state.reason}")
        tx, ty = fmnist.test_tensors()
        return fmnist.accuracy(exp.model(), tx, ty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=-5.0, help="attackers send global + scale * their delta")
    parser.add_argument("--samples", type=int, default=1000, help="training images per node")
    args = parser.parse_args()
    configure_logging("warning")
    torch.set_num_threads(1)
    fed = LocalFederation().start()
    rogues: list[RogueNode] = []
    try:
        shards = fmnist.write_shards(fed.root / "data", NODES, limit=NODES * args.samples, seed=3)
        honest = [f"site-{i}" for i in range(NODES - ATTACKERS)]
        fed.add_nodes(fed.shard_datasets(honest, shards[: len(honest)]))
        rogues = [RogueNode(fed, f"rogue-{i}", shards[NODES - ATTACKERS + i]) for i in range(ATTACKERS)]
        fed.add_aggregator("agg-1")
        fed.enroll("bench", "researcher")
        fed.wait_online({*honest, *(r.name for r in rogues)})
        plan = [("fedavg, no attack", "fedavg", {}, 1.0),
                ("fedavg", "fedavg", {}, args.scale),
                ("krum (f=2, m=6)", "krum", {"byzantine": ATTACKERS, "m": 6}, args.scale),
                ("trimmedmean (beta=0.2)", "trimmedmean", {"beta": 0.2}, args.scale),
                ("fedmedian", "fedmedian", {}, args.scale)]
        results = []
        for label, rule, rule_args, scale in plan:
            for r in rogues:
                r.scale = scale
            t0 = time.perf_counter()
            acc = run_job(fed, rule, rule_args, args.rounds)
            results.append((label, scale, acc, time.perf_counter() - t0))
            print(f"  {label:<24} attackers' scale {scale:+.0f}: accuracy {acc:.4f}", flush=True)
    finally:
        for r in rogues:
            r.close()
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)
    print(f"\n{NODES} nodes ({ATTACKERS} attackers sending global + ({args.scale:+.0f}) x their update), "
          f"{args.rounds} rounds, MLP 784-64-10, Fashion-MNIST test accuracy:")
    print(f"{'rule':<26}{'attack':>8}{'accuracy':>10}{'wall s':>8}")
    for label, scale, acc, wall in results:
        print(f"{label:<26}{'no' if scale == 1 else 'yes':>8}{acc:>10.4f}{wall:>8.1f}")


if __name__ == "__main__":
    main()
