"""Non-IID data: FedAvg vs FedProx vs SCAFFOLD after the same rounds, side by side.

Fashion-MNIST split by label as in McMahan et al. 2017: the training images sorted by class,
cut into 2 x N shards, and each of N nodes gets two shards (mostly two classes). One real
federation (TLS broker, node and aggregator processes); one job per rule with the same seed,
rounds, local epochs and learning rate; accuracy on the 10,000 test images.

    python -m benchmarks.heterogeneity [--nodes 10] [--rounds 10] [--epochs 2] [--mu 0.1]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from broker.local import LocalFederation
from common.identity import Identity
from common.logging import configure_logging
from researcher.experiment import Experiment
from scripts import fmnist

MODEL_ARGS = {"in_features": 784, "hidden": [64], "n_classes": 10}


def label_skewed_shards(folder: Path, nodes: int, per_node: int, seed: int = 0) -> tuple[list[Path], list[list[int]]]:
    """Two label-sorted shards per node; returns the files and each node's classes."""
    x, y = fmnist.load("train")
    rng = np.random.default_rng(seed)
    take = rng.permutation(len(x))[: nodes * per_node]
    order = take[np.argsort(y[take], kind="stable")]
    pieces = np.array_split(order, 2 * nodes)
    assignment = rng.permutation(2 * nodes).reshape(nodes, 2)
    folder.mkdir(parents=True, exist_ok=True)
    paths, classes = [], []
    for i, (a, b) in enumerate(assignment):
        idx = np.concatenate([pieces[a], pieces[b]])
        path = folder / f"skewed-{i:03d}.npz"
        np.savez(path, x=x[idx], y=y[idx].astype(np.int64))
        paths.append(path)
        classes.append(sorted({int(c) for c in np.unique(y[idx])}))
    return paths, classes


def run(fed: LocalFederation, rule: str, training_args: dict, rounds: int, nodes: int) -> tuple[float, float]:
    exp = Experiment(Identity.load(fed.ws.bundle_dir("bench")), plan="mlp", tags=["fmnist"], rounds=rounds, quorum=nodes,
                     model_args=MODEL_ARGS, aggregator=rule, training_args=training_args, seed=2, round_deadline_s=600)
    with exp:
        exp.submit()
        t0 = time.perf_counter()
        state = exp.watch(timeout_s=3600, progress=False)
        if state.status != "done":
            raise RuntimeError(f"{rule}: {state.reason}")
        tx, ty = fmnist.test_tensors()
        return fmnist.accuracy(exp.model(), tx, ty), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round (more: more client drift)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--mu", type=float, default=0.1, help="FedProx proximal strength")
    parser.add_argument("--samples", type=int, default=1200, help="training images per node")
    args = parser.parse_args()
    configure_logging("warning")
    fed = LocalFederation().start()
    try:
        shards, classes = label_skewed_shards(fed.root / "data", args.nodes, args.samples)
        names = [f"site-{i}" for i in range(args.nodes)]
        fed.add_nodes(fed.shard_datasets(names, shards))
        fed.add_aggregator("agg-1")
        fed.enroll("bench", "researcher")
        fed.wait_online(set(names))
        print("classes per node: " + "  ".join(f"{n}:{c}" for n, c in zip(names, classes, strict=True)), flush=True)
        base = {"epochs": args.epochs, "lr": args.lr, "batch_size": 32}
        results = []
        for label, rule, targs in [("fedavg", "fedavg", base), (f"fedprox (mu={args.mu})", "fedprox", {**base, "mu": args.mu}),
                                   ("scaffold", "scaffold", base)]:
            acc, wall = run(fed, rule, targs, args.rounds, args.nodes)
            results.append((label, acc, wall))
            print(f"  {label:<20} accuracy {acc:.4f} ({wall:.0f}s)", flush=True)
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)
    print(f"\nlabel-skewed Fashion-MNIST, {args.nodes} nodes x {args.samples} images (2 label shards each), "
          f"{args.rounds} rounds x {args.epochs} local epochs, SGD lr {args.lr}, MLP 784-64-10:")
    print(f"{'rule':<22}{'test accuracy':>14}{'wall s':>8}")
    for label, acc, wall in results:
        print(f"{label:<22}{acc:>14.4f}{wall:>8.0f}")


if __name__ == "__main__":
    main()
