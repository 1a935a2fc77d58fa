"""Study 2 of the paper: brain-imaging features across 4 heterogeneous centres.

The paper: 92 FreeSurfer features (subcortical volumes, cortical thickness) of 4,670
participants in 4 centres, corrected for sex, age and intracranial volume at each centre,
standardized federatedly with the global mean and std, then a linear VAE (5-D latent) trained
with FedAvg, 30 rounds of 15 epochs, lr 1e-3; two centres went offline during the run.

Here the cohort is synthetic (`brain_cohort`, following Table 1); each centre corrects its own
features and registers them as a CSV dataset on its own node; the global statistics come from
federated analytics (no row leaves a node); two of the four nodes are stopped for part of the
run and started again, and the run completes.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.identity import Identity
from common.training.zoo import VAE
from researcher.analytics import federated_statistics
from scripts.studies import brain_cohort
from scripts.studies.common import (
    federation,
    plot_round_times,
    plot_weight_norms,
    round_rows,
    run_job,
    write_csv,
)

LAYER = "mu.weight"  # a linear VAE's encoder is its input layer
OFFLINE = ("centre-3", "centre-4")


@dataclass(frozen=True)
class Config:
    rounds: int = 30
    epochs: int = 15
    lr: float = 1e-3
    latent: int = 5
    batch_size: int = 16
    offline_from: int = 8  # rounds during which OFFLINE centres are stopped
    offline_until: int = 16
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(rounds=14, epochs=15, offline_from=2, offline_until=4)


def write_centres(folder: Path, seed: int) -> tuple[dict, dict[str, Path]]:
    """Generate the cohort; each centre corrects its own features and writes its CSV."""
    cohort = brain_cohort.generate(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, c in cohort.items():
        corrected = brain_cohort.correct_confounds(c["features"], c["age"], c["sex"], c["icv"])
        c["corrected"] = corrected
        path = folder / f"{name}.csv"
        header = ",".join(f.replace(",", "_") for f in brain_cohort.FEATURES)
        np.savetxt(path, corrected, delimiter=",", header=header, comments="", fmt="%.6g")
        paths[name] = path
    return cohort, paths


def welch_t(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's t statistic and its two-sided p-value (normal approximation: groups are large)."""
    t = (a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return float(t), float(math.erfc(abs(t) / math.sqrt(2)))


def latent_of(model: VAE, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        mu, _ = model.encode(torch.from_numpy(x.astype(np.float32)))
    return mu.numpy()


def by_importance(model: VAE, z: np.ndarray) -> np.ndarray:
    """Latent dimensions ordered by how much of the reconstruction they carry (spread of the
    latent times the norm of its decoder column): a VAE's latents have no order of their own."""
    decoder = model.decoder[-1].weight.detach().numpy()  # (features, latent)
    weight = z.std(axis=0) * np.linalg.norm(decoder, axis=0)
    return np.argsort(-weight)


def plot_centre1(z: np.ndarray, group: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for g, colour in (("CN", "C2"), ("MCI", "C1"), ("AD", "C3")):
        pts = z[group == g]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=colour, label=f"{g} ({len(pts)})")
    ax.set_xlabel("latent 1 (most reconstruction carried)")
    ax.set_ylabel("latent 2")
    ax.set_title("Centre 1 in the federated linear VAE's latent space")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _take_offline(fed, cfg: Config, log: list[str]):
    """Once the job runs: stop two centres' nodes (SIGTERM) when round `offline_from` opens, start
    them again when round `offline_until` opens; the job goes on with the other two meanwhile."""

    def wait_round(exp, r: int) -> None:
        while (exp.poll(0.1).open_round or 0) < r and not exp.state.finished:
            pass

    def during(exp) -> None:
        wait_round(exp, cfg.offline_from)
        for name in OFFLINE:
            os.killpg(fed.process(f"node-{name}").pid, signal.SIGTERM)
        log.append(f"stopped {', '.join(OFFLINE)} when round {exp.state.open_round} was open")
        wait_round(exp, cfg.offline_until)
        for name in OFFLINE:
            fed.process(f"node-{name}").wait(timeout=60)
            fed.start_node(name)
        log.append(f"restarted {', '.join(OFFLINE)} when round {exp.state.open_round} was open")

    return during


def run(out: Path, cfg: Config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cohort, paths = write_centres(out / "data", cfg.seed)
    write_csv(out / "table1_generated.csv", brain_cohort.table(cohort))
    datasets = {n: [{"name": "freesurfer", "type": "csv", "path": str(p), "tag": "brain"}] for n, p in paths.items()}
    events: list[str] = []
    t0 = time.perf_counter()
    with federation(datasets) as fed:
        stats = federated_statistics(Identity.load(fed.ws.bundle_dir("study")), list(paths), tags=["brain"])
        exp, state = run_job(
            fed, _take_offline(fed, cfg, events), plan="linear_vae", tags=["brain"], rounds=cfg.rounds, quorum=2,
            stragglers="wait", round_deadline_s=3600, seed=cfg.seed,
            model_args={"in_features": brain_cohort.N_FEATURES, "hidden": [], "latent": cfg.latent},
            training_args={"epochs": cfg.epochs, "lr": cfg.lr, "optimizer": "adam", "batch_size": cfg.batch_size,
                           "standardize": stats.standardization(), "report_norms": [LAYER]},
            description="Fed-BioMed paper, study 2: linear VAE on brain features over 4 centres")
        exp.results(out / "job")
        model = exp.model()
        exp.close()
    wall = time.perf_counter() - t0
    c1 = cohort["centre-1"]
    z = latent_of(model, (c1["corrected"] - stats.mean) / np.maximum(stats.std, 1e-12))
    z = z[:, by_importance(model, z)]
    plot_centre1(z, c1["group"], out / "fig4_centre1_latent.png")
    plot_weight_norms(state, LAYER, out / "fig3_weight_norms.png",
                      "Encoder weight norm: 4 centres (local updates) and the federated model")
    plot_round_times(state, out / "fig5_round_times.png", "Local training time per centre and round (4 centres)")
    write_csv(out / "rounds.csv", round_rows(state, LAYER))
    tests = []
    for d in range(cfg.latent):
        t, p = welch_t(z[c1["group"] == "CN", d], z[c1["group"] == "AD", d])
        tests.append({"latent_dim": d + 1, "t_CN_vs_AD": t, "p": p})
    write_csv(out / "latent_group_tests.csv", tests)
    missing = sorted({m for h in state.history for m in h["missing"]})
    best = max(tests, key=lambda r: abs(r["t_CN_vs_AD"]))
    summary = {"rounds": cfg.rounds, "local_epochs": cfg.epochs, "participants": int(stats.n),
               "first_round_loss": state.history[0]["metrics"]["train_loss"],
               "last_round_loss": state.history[-1]["metrics"]["train_loss"],
               "rounds_without_all_centres": sum(1 for h in state.history if len(h["reports"]) < len(paths)),
               "centres_per_round": " ".join(str(len(h["reports"])) for h in state.history),
               "missing_centres": ";".join(missing), "offline_events": " | ".join(events),
               "best_latent_dim": best["latent_dim"], "best_t_CN_vs_AD": best["t_CN_vs_AD"], "best_p": best["p"],
               "wall_s": wall}
    write_csv(out / "summary.csv", [summary])
    return summary
