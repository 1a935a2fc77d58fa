"""Write a synthetic patient table for a demo site (no real data ships with the images).

Each site's seed shifts its cohort a little (age, prevalence), as real centres differ. The
outcome depends on the features through a fixed logistic model, so a federation can learn it.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
from pathlib import Path

FEATURES = ["age", "bmi", "systolic_bp", "cholesterol", "glucose", "smoker"]


def rows(n: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    shift = (seed % 5) - 2
    out = []
    for _ in range(n):
        age = rng.gauss(58 + 3 * shift, 11)
        bmi = rng.gauss(27, 4)
        bp = rng.gauss(130 + 2 * shift, 15)
        chol = rng.gauss(5.2, 1.0)
        glucose = rng.gauss(5.8, 1.2)
        smoker = float(rng.random() < 0.25)
        z = 0.06 * (age - 58) + 0.08 * (bmi - 27) + 0.03 * (bp - 130) + 0.5 * (chol - 5.2) + 0.4 * (glucose - 5.8) + 0.9 * smoker - 0.3
        outcome = float(rng.random() < 1 / (1 + math.exp(-z)))
        out.append([round(age, 1), round(bmi, 1), round(bp), round(chol, 2), round(glucose, 2), smoker, outcome])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows", type=int, default=600)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "outcome"])
        writer.writerows(rows(args.rows, args.seed))
    print(f"wrote {args.rows} synthetic rows to {args.out}")


if __name__ == "__main__":
    main()
