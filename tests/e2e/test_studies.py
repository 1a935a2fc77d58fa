"""The paper's two studies, quick versions, end to end (`python -m scripts.study NAME --quick`)."""

from __future__ import annotations

import csv

import pytest

from scripts.studies import brain, mnist_vae

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # make test-slow (and CI)

FIGURES = ("fig3_weight_norms.png", "fig4_latent_space.png", "fig5_round_times.png")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_mnist_vae_quick(tmp_path):
    summary = mnist_vae.run(tmp_path, mnist_vae.Config.quick())
    assert summary["last_round_loss"] < summary["first_round_loss"]
    assert summary["federated_test_recon_loss"] > 0 and summary["central_test_recon_loss"] > 0
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 10_000, name
    rows = _rows(tmp_path / "rounds.csv")
    assert len(rows) == 4 * 5 and all(float(r["local_norm"]) > 0 and float(r["global_norm"]) > 0 for r in rows)
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "job" / "model.pt").exists()


def test_brain_quick(tmp_path):
    summary = brain.run(tmp_path, brain.Config.quick())
    assert summary["participants"] == 4665
    assert summary["last_round_loss"] < summary["first_round_loss"]
    counts = [int(c) for c in summary["centres_per_round"].split()]
    assert counts[0] == 4 and 2 in counts  # two centres went offline for part of the run, which completed
    assert abs(summary["best_t_CN_vs_AD"]) > 5  # CN and AD differ in the latent space (Welch t)
    for name in ("fig3_weight_norms.png", "fig4_centre1_latent.png", "fig5_round_times.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    table = {r["centre"]: r for r in _rows(tmp_path / "table1_generated.csv")}
    assert table["centre-3"]["n"] == "2000" and table["centre-1"]["CN"] == "175"
