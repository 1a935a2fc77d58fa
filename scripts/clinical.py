"""A synthetic clinical table (dementia cohort) for demos and tests: strings, gaps, site biases.

Diagnosis (CN / MCI / AD) drives age, MMSE, a CSF biomarker and the APOE genotype; sex and
smoking are noise. Every site has its own mix: one sees no AD, sites record different smoking
categories, one a rare `unknown` (3 rows: below the publishing threshold). About 5% of the
feature cells are missing. There is a visit date (dropped as a date) and a patient id (dropped
as an identifier), as real exports have.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

DX = ("CN", "MCI", "AD")
APOE = ("e3/e3", "e3/e4", "e4/e4")
HEADER = ["patient_id", "visit_date", "age", "sex", "mmse", "abeta", "apoe", "smoking", "dx"]
# per site: diagnosis mix, smoking categories recorded
SITES = {
    "site-1": ((0.4, 0.35, 0.25), ("never", "former")),
    "site-2": ((0.3, 0.3, 0.4), ("never", "former", "current")),
    "site-3": ((0.55, 0.45, 0.0), ("never", "current")),
}


def rows(n: int, dx_mix: tuple[float, ...], smoking: tuple[str, ...], rng: np.random.Generator,
         *, missing: float = 0.05, rare: int = 0, start_id: int = 0) -> list[list[str]]:
    """`n` patients as CSV rows (strings; '' where missing)."""
    out = []
    for i in range(n):
        d = int(rng.choice(3, p=dx_mix))
        apoe_p = [(0.7, 0.25, 0.05), (0.5, 0.38, 0.12), (0.3, 0.45, 0.25)][d]
        cells = {
            "patient_id": f"P{start_id + i:06d}",
            "visit_date": f"20{rng.integers(15, 24)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",
            "age": f"{rng.normal(68 + 4 * d, 6):.0f}",
            "sex": "MF"[int(rng.integers(2))],
            "mmse": f"{np.clip(rng.normal(29 - 3.2 * d, 1.4), 0, 30):.0f}",
            "abeta": f"{rng.normal(1.0 - 0.45 * d, 0.25):.3f}",
            "apoe": APOE[int(rng.choice(3, p=apoe_p))],
            "smoking": "unknown" if i < rare else smoking[int(rng.integers(len(smoking)))],
            "dx": DX[d],
        }
        for key in ("age", "sex", "mmse", "abeta", "apoe", "smoking"):
            if rng.random() < missing:
                cells[key] = ""
        out.append([cells[h] for h in HEADER])
    return out


def write(path: Path, table: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(table)
    return path


def write_sites(folder: Path, n_per_site: int = 400, n_test: int = 1200, seed: int = 0) -> dict[str, Path]:
    """One CSV per site, plus `test.csv` (all diagnoses, every smoking category) and
    `pooled.csv` (the sites' rows together, for the central baseline)."""
    rng = np.random.default_rng(seed)
    paths, pooled = {}, []
    for k, (name, (mix, smoking)) in enumerate(SITES.items()):
        table = rows(n_per_site, mix, smoking, rng, rare=3 if name == "site-2" else 0, start_id=k * 100_000)
        pooled += table
        paths[name] = write(folder / f"{name}.csv", table)
    paths["pooled"] = write(folder / "pooled.csv", pooled)
    test = rows(n_test, (1 / 3, 1 / 3, 1 / 3), ("never", "former", "current"), rng, start_id=900_000)
    paths["test"] = write(folder / "test.csv", test)
    return paths
