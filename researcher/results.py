"""The experiment folder: what a researcher keeps of a job (spec, metrics, final model, plots)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from researcher.experiment import Experiment


def _spec_json(exp: Experiment) -> dict:
    return {
        "job_id": exp.job_id,
        "owner": exp.identity.name,
        "plan": exp.plan.model_dump(),
        "model_args": exp.model_args,
        "training_args": exp.training_args,
        **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in exp.spec_fields.items()},
    }


def write_results(folder: Path, exp: Experiment) -> Path:
    """Write job.json, metrics.json, rounds.csv, nodes.csv, model.pt, loss.png, node_times.png
    (and validation.png when the nodes held out a validation split)."""
    state = exp.state
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps(_spec_json(exp), indent=2, default=str))
    (folder / "metrics.json").write_text(json.dumps(
        {"status": state.status, "reason": state.reason, "round": state.round, "history": state.history,
         "notices": state.notices}, indent=2, default=str))
    metric_names = sorted({m for h in state.history for m in h["metrics"]})
    with open(folder / "rounds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "nodes", "missing", "duration_s", *metric_names])
        for h in state.history:
            writer.writerow([h["round"], len(h["reports"]), ";".join(h["missing"]), f"{h['duration_s']:.3f}",
                             *(h["metrics"].get(m, "") for m in metric_names)])
    node_metrics = sorted({m for h in state.history for r in h["reports"] for m in r["metrics"]})
    node_timings = sorted({t for h in state.history for r in h["reports"] for t in r["timings"]})
    with open(folder / "nodes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "node", "n_samples", *node_metrics, *node_timings])
        for h in state.history:
            for r in h["reports"]:
                writer.writerow([h["round"], r["node"], r["n_samples"], *(r["metrics"].get(m, "") for m in node_metrics),
                                 *(r["timings"].get(t, "") for t in node_timings)])
    if state.params:
        torch.save({k: v.clone() for k, v in state.params.items()}, folder / "model.pt")
    if state.history:
        plot_loss(state.history, folder / "loss.png")
        plot_node_times(state.history, folder / "node_times.png")
        if any(m.startswith("val_") for h in state.history for m in h["metrics"]):
            plot_validation(state.history, folder / "validation.png")
    return folder


def _node_lines(ax, history: list[dict], metric: str) -> None:
    """One thin grey line per node: its own value of `metric` in each round it reported."""
    for node in sorted({r["node"] for h in history for r in h["reports"]}):
        pts = [(h["round"], r["metrics"][metric]) for h in history for r in h["reports"]
               if r["node"] == node and metric in r["metrics"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), color="0.75", linewidth=0.8)


def finish_round_plot(fig, ax, path: Path, *, ylabel: str, title: str, legend_size: float | None = None,
                      dpi: int = 110) -> None:
    """Rounds on the x axis (integers), labels, legend, save as PNG, free the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_validation(history: list[dict], path: Path) -> None:
    """Federated evaluation: the received global model vs each node's local update, on the
    nodes' validation splits (sample-weighted over nodes; grey: each node's local score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if any("val_accuracy_global" in h["metrics"] for h in history) else "loss"
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [h["round"] for h in history]
    _node_lines(ax, history, f"val_{metric}_local")
    for which, style in (("global", "o-"), ("local", "s--")):
        ax.plot(rounds, [h["metrics"].get(f"val_{metric}_{which}", float("nan")) for h in history], style,
                label=f"{'received global model' if which == 'global' else 'local update'} (weighted)")
    finish_round_plot(fig, ax, path, ylabel=f"validation {metric}", title="Federated evaluation on the nodes' validation splits")


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [h["round"] for h in history]
    _node_lines(ax, history, "train_loss")
    ax.plot(rounds, [h["metrics"].get("train_loss", float("nan")) for h in history], "o-", color="C0",
            linewidth=2, label="weighted mean over nodes")
    finish_round_plot(fig, ax, path, ylabel="local training loss", title="Training loss per round (grey: each node)")


def plot_node_times(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    nodes = sorted({r["node"] for h in history for r in h["reports"]})
    for i, node in enumerate(nodes):
        pts = [(h["round"], r["timings"].get("train_s", 0.0)) for h in history for r in h["reports"] if r["node"] == node]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i % 10}", label=node, linewidth=1)
    ax.plot([h["round"] for h in history], [h["duration_s"] for h in history], "k--", linewidth=2, label="round wall time")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title("Local training time per node and round")
    if len(nodes) <= 12:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
