"""FedAvg over IID shards vs the same model trained centrally for the same number of epochs.

Federated: N nodes of a real local federation (TLS broker, node and aggregator processes),
R rounds of E local epochs. Central: one plain torch loop over the whole training set for
R x E epochs, same model, batch size, optimizer and learning rate. Both accuracies are on the
10,000 held-out Fashion-MNIST test images, printed side by side.

    python -m benchmarks.fedavg_vs_central [--nodes 5] [--rounds 20] [--epochs 1]
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from broker.local import LocalFederation
from common.logging import configure_logging
from common.training.zoo import MLP
from researcher.experiment import Experiment
from scripts import fmnist

MODEL_ARGS = {"in_features": 784, "hidden": [128], "n_classes": 10}


def central(epochs: int, lr: float, batch: int, seed: int = 0) -> float:
    x, y = fmnist.load("train")
    x = torch.from_numpy(x[:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(y.astype(np.int64))
    torch.manual_seed(seed)
    model = MLP(**MODEL_ARGS)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    tx, ty = fmnist.test_tensors()
    return fmnist.accuracy(model, tx, ty)


def federated(nodes: int, rounds: int, epochs: int, lr: float, batch: int, seed: int = 0) -> float:
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", nodes, seed=seed)
        names = [f"site-{i}" for i in range(nodes)]
        fed.add_nodes(fed.shard_datasets(names, shards))
        fed.add_aggregator("fedavg-1")
        fed.wait_online(set(names))
        exp = Experiment(fed.enroll("bench", "researcher"), plan="mlp", tags=["fmnist"], rounds=rounds, quorum=nodes,
                         model_args=MODEL_ARGS, training_args={"epochs": epochs, "lr": lr, "batch_size": batch},
                         seed=seed, round_deadline_s=600)
        with exp:
            exp.submit()
            state = exp.watch(timeout_s=3600)
            if state.status != "done":
                raise RuntimeError(state.reason)
            tx, ty = fmnist.test_tensors()
            return fmnist.accuracy(exp.model(), tx, ty)
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    configure_logging("warning")
    t0 = time.perf_counter()
    fed_acc = federated(args.nodes, args.rounds, args.epochs, args.lr, args.batch)
    t1 = time.perf_counter()
    cen_acc = central(args.rounds * args.epochs, args.lr, args.batch)
    t2 = time.perf_counter()
    print(f"\nMLP 784-128-10, SGD lr {args.lr}, batch {args.batch}, {args.rounds * args.epochs} epochs over the data")
    print(f"federated ({args.nodes} IID nodes, {args.rounds} rounds x {args.epochs} epoch): accuracy {fed_acc:.4f}  ({t1 - t0:.0f}s)")
    print(f"central (one loop, {args.rounds * args.epochs} epochs):                 accuracy {cen_acc:.4f}  ({t2 - t1:.0f}s)")
    gap = (cen_acc - fed_acc) * 100
    print(f"gap: {gap:+.2f} points ({'within' if abs(gap) <= 2 else 'OUTSIDE'} the 2-point target)")


if __name__ == "__main__":
    main()
