"""Study 1 of the paper: an image VAE (2-D latent) trained with FedAvg across 25 centres.

The paper split MNIST's 60,000 training images equally across 25 emulated centres and trained a
VAE (three-layer non-linear encoder and decoder, 2-D latent space) with FedAvg, lr 1e-3,
10 local epochs per round, 30 rounds. We use Fashion-MNIST (same size and format). Besides
the paper's figures, the same VAE is trained centrally on the pooled images for the same
number of epochs, and both test reconstruction losses are printed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from broker.local import LocalFederation
from common.training.zoo import VAE
from scripts import fmnist
from scripts.studies.common import (
    federation,
    plot_round_times,
    plot_weight_norms,
    round_rows,
    run_job,
    write_csv,
)

LAYER = "encoder.0.weight"  # the input layer, as in the paper's Figure 3


@dataclass(frozen=True)
class Config:
    centres: int = 25
    rounds: int = 30
    epochs: int = 10
    images: int = 60_000
    lr: float = 1e-3
    batch_size: int = 64
    hidden: tuple[int, ...] = (512, 256)
    test_images: int = 10_000
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(centres=5, rounds=4, epochs=1, images=3000, hidden=(128, 64), test_images=2000)


def model_args(cfg: Config) -> dict:
    return {"in_features": 784, "hidden": list(cfg.hidden), "latent": 2}


def reconstruction_loss(model: VAE, x: torch.Tensor) -> float:
    """Mean per-image BCE of the reconstruction from the latent mean (no sampling)."""
    model.eval()
    with torch.no_grad():
        recon, _, _ = model(x)
        return float(F.binary_cross_entropy_with_logits(recon, x.flatten(1), reduction="sum")) / len(x)


def central(cfg: Config, x: torch.Tensor) -> VAE:
    """The same VAE, optimizer and batch size trained on the pooled images for rounds x epochs."""
    from common.training.zoo import vae_loss

    torch.manual_seed(cfg.seed)
    model = VAE(**model_args(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.rounds * cfg.epochs):
        for idx in torch.randperm(len(x)).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            vae_loss(model, x[idx]).backward()
            opt.step()
    return model


def plot_latent(model: VAE, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad():
        mu, _ = model.encode(x)
    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for c in range(10):
        pts = mu[y == c].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.5, color=f"C{c}", label=classes[c])
    ax.set_xlabel("latent 1")
    ax.set_ylabel("latent 2")
    ax.set_title("Test images in the federated VAE's latent space")
    ax.legend(markerscale=4, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: Path, cfg: Config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="fbm-vae-shards-"))  # copies of the apt dataset: not kept
    shards = fmnist.write_shards(data, cfg.centres, limit=cfg.images, seed=cfg.seed)
    names = [f"centre-{i + 1:02d}" for i in range(cfg.centres)]
    datasets = LocalFederation.shard_datasets(names, shards, name="fmnist")
    t0 = time.perf_counter()
    with federation(datasets) as fed:
        exp, state = run_job(fed, plan="vae", tags=["fmnist"], rounds=cfg.rounds, quorum=cfg.centres,
                             model_args=model_args(cfg), round_deadline_s=3600, seed=cfg.seed,  # the nodes' default max_round_seconds
                             training_args={"epochs": cfg.epochs, "lr": cfg.lr, "optimizer": "adam",
                                            "batch_size": cfg.batch_size, "report_norms": [LAYER]},
                             description="Fed-BioMed paper, study 1: VAE on (Fashion-)MNIST over 25 centres")
        exp.results(out / "job")
        fed_model = exp.model()
        exp.close()
    fed_s = time.perf_counter() - t0
    pooled = np.concatenate([np.load(p)["x"] for p in shards])
    shutil.rmtree(data, ignore_errors=True)
    x = torch.from_numpy(pooled[:, None].astype(np.float32) / 255.0)
    t1 = time.perf_counter()
    cen_model = central(cfg, x)
    cen_s = time.perf_counter() - t1
    tx, ty = fmnist.test_tensors(cfg.test_images)
    fed_loss, cen_loss = reconstruction_loss(fed_model, tx), reconstruction_loss(cen_model, tx)
    plot_weight_norms(state, LAYER, out / "fig3_weight_norms.png",
                      f"Input-layer weight norm: {cfg.centres} centres (local updates) and the federated model")
    plot_latent(fed_model, tx, ty, out / "fig4_latent_space.png")
    plot_round_times(state, out / "fig5_round_times.png", f"Local training time per centre and round ({cfg.centres} centres)")
    write_csv(out / "rounds.csv", round_rows(state, LAYER))
    summary = {"centres": cfg.centres, "rounds": cfg.rounds, "local_epochs": cfg.epochs, "images": cfg.images,
               "federated_test_recon_loss": fed_loss, "central_test_recon_loss": cen_loss,
               "ratio": fed_loss / cen_loss, "first_round_loss": state.history[0]["metrics"]["train_loss"],
               "last_round_loss": state.history[-1]["metrics"]["train_loss"], "federated_wall_s": fed_s,
               "central_wall_s": cen_s}
    write_csv(out / "summary.csv", [summary])
    return summary
