"""`make demo`: a whole federation on this machine trains a Fashion-MNIST classifier.

It starts a TLS Mosquitto broker, N node processes (each registering one shard of
Fashion-MNIST from the apt package), one FedAvg aggregator, submits an MLP job as a
researcher, follows it, prints the test accuracy of the final model, writes the results
folder, and stops everything it started.

    python -m scripts.demo [--nodes 5] [--rounds 3] [--epochs 1] [--out demo-results]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from broker.local import LocalFederation
from common.logging import configure_logging
from researcher.experiment import Experiment
from scripts import fmnist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5, help="number of hospital nodes (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    parser.add_argument("--samples", type=int, default=None, help="use only this many training images")
    parser.add_argument("--out", type=Path, default=Path("demo-results"), help="results folder (default demo-results/)")
    parser.add_argument("--keep", action="store_true", help="keep the federation's temp folder (logs, databases)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    configure_logging("warning")
    started = time.monotonic()
    fed = LocalFederation()
    try:
        fed.start()
        console.print(f"[bold]1.[/bold] broker up: TLS on 127.0.0.1:{fed.port}, workspace {fed.ws.root}")
        shards = fmnist.write_shards(fed.root / "data", args.nodes, limit=args.samples)
        names = [f"hospital-{i + 1}" for i in range(args.nodes)]
        fed.add_nodes(fed.shard_datasets(names, shards, name="fmnist", tag=["fmnist", "images"]))
        fed.add_aggregator("fedavg-1")
        bundle = fed.enroll("alice", "researcher")
        fed.wait_online(set(names))
        console.print(f"[bold]2.[/bold] {args.nodes} nodes started, each with its own shard "
                      f"(~{len(fmnist.load()[0]) if args.samples is None else args.samples} images in all); "
                      "aggregator fedavg-1 started")
        exp = Experiment(bundle, plan="mlp", tags=["fmnist"], rounds=args.rounds, quorum=args.nodes,
                         model_args={"in_features": 784, "hidden": [128], "n_classes": 10},
                         training_args={"epochs": args.epochs, "lr": args.lr, "batch_size": 64},
                         round_deadline_s=60, description="make demo: MLP on Fashion-MNIST")
        with exp:
            job = exp.submit()
            console.print(f"[bold]3.[/bold] researcher alice submitted job {job}")
            state = exp.watch(timeout_s=600, console=console)
        if state.status != "done":
            raise SystemExit(f"job failed: {state.reason}")
        table = Table("round", "nodes", "train loss", "round s", "slowest node train s")
        for h in state.history:
            slowest = max(r["timings"].get("train_s", 0.0) for r in h["reports"])
            table.add_row(str(h["round"]), str(len(h["reports"])), f"{h['metrics']['train_loss']:.4f}",
                          f"{h['duration_s']:.2f}", f"{slowest:.2f}")
        console.print(table)
        x, y = fmnist.test_tensors()
        acc = fmnist.accuracy(exp.model(), x, y)
        console.print(f"[bold]4.[/bold] test accuracy of the final global model on the 10,000 held-out images: "
                      f"[bold green]{acc:.2%}[/bold green]")
        folder = exp.results(args.out / job)
        console.print(f"[bold]5.[/bold] results (job spec, metrics CSV/JSON, model.pt, loss.png, node_times.png): {folder}")
    finally:
        fed.stop()
        if not args.keep:
            shutil.rmtree(fed.root, ignore_errors=True)
    console.print(f"everything stopped; demo took {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
