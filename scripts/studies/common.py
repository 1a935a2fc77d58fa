"""What both paper studies share: a local federation, a job, and the paper's figures.

Figures (PNG): the weight-norm evolution of the model's input layer, one line per centre (its
local update) and the federated model dashed (the paper's Figure 3); per-centre local training
time per round with the average round time (Figure 5). Metrics go to CSV.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.local import LocalFederation
from common.identity import Identity
from researcher.experiment import Experiment, JobState
from researcher.results import finish_round_plot


@contextmanager
def federation(datasets: dict[str, list[dict[str, str]]], *, node_env: dict[str, str] | None = None):
    """A local federation (TLS broker, one node process per centre, an aggregator), torn down after."""
    fed = LocalFederation().start()
    try:
        fed.add_nodes(datasets, env=node_env)
        fed.add_aggregator("agg-1")
        fed.enroll("study", "researcher")
        fed.wait_online(set(datasets), timeout_s=600)
        yield fed
    finally:
        fed.stop()
        if not os.environ.get("FBM_KEEP_STUDY_FEDERATION"):
            shutil.rmtree(fed.root, ignore_errors=True)
        else:
            print(f"federation kept in {fed.root}")


def run_job(fed: LocalFederation, during: Callable[[Experiment], None] | None = None, **experiment: Any) -> tuple[Experiment, JobState]:
    """Submit, optionally act while it runs (e.g. take centres offline), and watch to the end."""
    exp = Experiment(Identity.load(fed.ws.bundle_dir("study")), **experiment)
    exp.submit()
    if during is not None:
        during(exp)
    state = exp.watch(timeout_s=24 * 3600)
    if state.status != "done":
        exp.close()
        raise RuntimeError(f"the study's job failed: {state.reason}")
    return exp, state


def norm_series(state: JobState, layer: str) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """Per-centre (round, local norm) and the federated model's (round, norm) of `layer`."""
    key = f"norm:{layer}"
    local: dict[str, list[tuple[int, float]]] = {}
    for h in state.history:
        for r in h["reports"]:
            if key in r["metrics"]:
                local.setdefault(r["node"], []).append((h["round"], r["metrics"][key]))
    glob = [(h["round"], h["notes"]["norms"][layer]) for h in state.history if layer in h.get("notes", {}).get("norms", {})]
    return local, glob


def plot_weight_norms(state: JobState, layer: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local, glob = norm_series(state, layer)
    rounds = [h["round"] for h in state.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (node, pts) in enumerate(sorted(local.items())):
        by_round = dict(pts)  # a round the centre missed is a gap in its line, not a straight segment
        pts = [(r, by_round.get(r, float("nan"))) for r in rounds]
        ax.plot(*zip(*pts, strict=True), "o-", markersize=2.5, color=f"C{i % 10}", linewidth=0.8, alpha=0.8,
                label=node if len(local) <= 6 else None)
    if glob:
        ax.plot(*zip(*glob, strict=True), "k--", linewidth=2.2, label="federated model")
    finish_round_plot(fig, ax, path, ylabel=f"||{layer}||", title=title, legend_size=8, dpi=120)


def plot_round_times(state: JobState, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    nodes = sorted({r["node"] for h in state.history for r in h["reports"]})
    for i, node in enumerate(nodes):
        by_round = {h["round"]: r["timings"].get("train_s", 0.0) for h in state.history for r in h["reports"] if r["node"] == node}
        pts = [(h["round"], by_round.get(h["round"], float("nan"))) for h in state.history]
        ax.plot(*zip(*pts, strict=True), "o-", markersize=2, linewidth=0.8, color=f"C{i % 10}",
                label=node if len(nodes) <= 6 else None)
    rounds = [h["round"] for h in state.history]
    durations = [h["duration_s"] for h in state.history]
    ax.plot(rounds, durations, "k--", linewidth=2, label=f"round time (mean {sum(durations) / len(durations):.1f} s)")
    finish_round_plot(fig, ax, path, ylabel="seconds", title=title, legend_size=8, dpi=120)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def round_rows(state: JobState, layer: str) -> list[dict[str, Any]]:
    """One CSV row per round and centre: loss, local norm, training time; plus the global norm."""
    rows = []
    for h in state.history:
        glob = h.get("notes", {}).get("norms", {}).get(layer)
        for r in h["reports"]:
            rows.append({"round": h["round"], "centre": r["node"], "n_samples": r["n_samples"],
                         "train_loss": r["metrics"].get("train_loss"), "local_norm": r["metrics"].get(f"norm:{layer}"),
                         "global_norm": glob, "train_s": r["timings"].get("train_s"), "round_s": h["duration_s"]})
    return rows
