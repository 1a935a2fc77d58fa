"""A synthetic brain-imaging cohort following Table 1 of the Fed-BioMed paper (4 centres).

The real data (FreeSurfer features of ADNI, UK Biobank, ...) cannot be shared, so each centre's
participants are generated with the paper's demographics and with the structure that matters
for the study: 92 features (24 subcortical volumes in mm^3, 68 cortical thicknesses in mm)
that are correlated (a 6-factor model), shrink with age, shrink more with MCI and much more
with AD in the medial temporal lobe, scale with intracranial volume (ICV, larger in men), and
carry a per-centre scanner offset.

Table 1's diagnosis counts (healthy / MCI-AD) total 4,665 participants, close to the paper's
4,670, while its M/F counts total 4,970; we use the diagnosis counts as each centre's size and
draw sex with the centre's M/F proportion. Centre 1's MCI/AD participants are split 64% MCI /
36% AD (the paper does not give the split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_SUBCORTICAL, N_THICKNESS = 24, 68
N_FEATURES = N_SUBCORTICAL + N_THICKNESS
SUBCORTICAL = ["Left-Hippocampus", "Right-Hippocampus", "Left-Amygdala", "Right-Amygdala", "Left-Thalamus",
               "Right-Thalamus", "Left-Caudate", "Right-Caudate", "Left-Putamen", "Right-Putamen", "Left-Pallidum",
               "Right-Pallidum", "Left-Accumbens", "Right-Accumbens", "Left-VentralDC", "Right-VentralDC",
               "Left-Lateral-Ventricle", "Right-Lateral-Ventricle", "Left-Inf-Lat-Vent", "Right-Inf-Lat-Vent",
               "Brain-Stem", "CSF", "3rd-Ventricle", "4th-Ventricle"]
REGIONS = ["bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "cuneus", "entorhinal", "fusiform",
           "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital", "lateralorbitofrontal",
           "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal", "paracentral", "parsopercularis",
           "parsorbitalis", "parstriangularis", "pericalcarine", "postcentral", "posteriorcingulate", "precentral",
           "precuneus", "rostralanteriorcingulate", "rostralmiddlefrontal", "superiorfrontal", "superiorparietal",
           "superiortemporal", "supramarginal", "frontalpole", "temporalpole", "transversetemporal", "insula"]
THICKNESS = [f"{h}_{r}_thickness" for h in ("lh", "rh") for r in REGIONS]
FEATURES = SUBCORTICAL + THICKNESS
# regions hit hardest by Alzheimer's disease (medial temporal lobe)
AD_REGIONS = {"Hippocampus", "Amygdala", "Inf-Lat-Vent", "entorhinal", "parahippocampal", "inferiortemporal",
              "middletemporal", "fusiform", "temporalpole"}
VENTRICLES = {"Lateral-Ventricle", "Inf-Lat-Vent", "3rd-Ventricle", "4th-Ventricle", "CSF"}


@dataclass(frozen=True)
class Centre:
    name: str
    male: int
    female: int
    healthy: int
    impaired: int  # MCI or AD
    age_mean: float
    age_sd: float
    age_min: float
    age_max: float

    @property
    def n(self) -> int:
        return self.healthy + self.impaired


# The paper's Table 1.
TABLE_1 = [
    Centre("centre-1", 448, 353, 175, 621, 73.74, 7.23, 54, 91),
    Centre("centre-2", 454, 362, 816, 0, 28.72, 3.70, 22, 37),
    Centre("centre-3", 1070, 930, 2000, 0, 63.93, 7.49, 47, 81),
    Centre("centre-4", 573, 780, 695, 358, 67.58, 10.04, 43, 97),
]
MCI_SHARE = 0.64


def _truncated_normal(rng: np.random.Generator, n: int, mean: float, sd: float, lo: float, hi: float) -> np.ndarray:
    out = rng.normal(mean, sd, n)
    bad = (out < lo) | (out > hi)
    while bad.any():
        out[bad] = rng.normal(mean, sd, int(bad.sum()))
        bad = (out < lo) | (out > hi)
    return out


def _feature_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-feature baselines and effect sizes, shared by every centre (one population)."""
    sub_base = rng.uniform(1500, 8000, N_SUBCORTICAL)
    is_ventricle = np.array([any(v in f for v in VENTRICLES) for f in FEATURES])
    is_ad = np.array([any(a in f for a in AD_REGIONS) for f in FEATURES])
    is_volume = np.arange(N_FEATURES) < N_SUBCORTICAL
    base = np.concatenate([sub_base, rng.uniform(2.0, 3.4, N_THICKNESS)])
    base[is_ventricle & is_volume] = rng.uniform(800, 15000, int((is_ventricle & is_volume).sum()))
    # relative change per year of age after 20 (ventricles grow), and for MCI / AD
    age = np.where(is_volume, -0.0045, -0.0030) * rng.uniform(0.6, 1.4, N_FEATURES)
    age[is_ventricle] = rng.uniform(0.01, 0.025, int(is_ventricle.sum()))
    ad = np.where(is_ad, -0.18, -0.04) * rng.uniform(0.7, 1.3, N_FEATURES)
    ad[is_ventricle] = rng.uniform(0.15, 0.35, int(is_ventricle.sum()))
    loadings = rng.normal(0, 1, (N_FEATURES, 6)) * np.where(is_volume, 0.05, 0.04)[:, None]
    return {"base": base, "age": age, "ad": ad, "volume": is_volume.astype(float), "loadings": loadings}


def generate(seed: int = 0, centres: list[Centre] = TABLE_1) -> dict[str, dict[str, np.ndarray]]:
    """{centre: {"features": (n, 92), "age", "sex" (1 = male), "icv" (cm^3), "group" (CN/MCI/AD)}}."""
    rng = np.random.default_rng(seed)
    model = _feature_model(rng)
    out: dict[str, dict[str, np.ndarray]] = {}
    for c in centres:
        crng = np.random.default_rng([seed, int(c.name.split("-")[1])])
        n = c.n
        sex = (crng.random(n) < c.male / (c.male + c.female)).astype(np.int64)
        age = _truncated_normal(crng, n, c.age_mean, c.age_sd, c.age_min, c.age_max)
        n_mci = int(round(c.impaired * MCI_SHARE))
        group = np.array(["CN"] * c.healthy + ["MCI"] * n_mci + ["AD"] * (c.impaired - n_mci))
        order = crng.permutation(n)
        group = group[order]
        icv = np.where(sex == 1, crng.normal(1550, 120, n), crng.normal(1380, 110, n))
        severity = np.select([group == "AD", group == "MCI"], [1.0, 0.35], 0.0)
        years = np.maximum(age - 20.0, 0.0)
        rel = 1.0 + model["age"] * years[:, None] + model["ad"] * severity[:, None]
        icv_scale = 1.0 + model["volume"] * (icv[:, None] / 1450.0 - 1.0) * 0.9
        noise = crng.normal(0, 1, (n, 6)) @ model["loadings"].T + crng.normal(0, 0.03, (n, N_FEATURES))
        scanner = crng.normal(0, 0.03, N_FEATURES)  # a multiplicative offset per centre and feature
        features = model["base"] * rel * icv_scale * (1.0 + noise) * (1.0 + scanner)
        out[c.name] = {"features": features, "age": age, "sex": sex, "icv": icv, "group": group}
    return out


def correct_confounds(features: np.ndarray, age: np.ndarray, sex: np.ndarray, icv: np.ndarray) -> np.ndarray:
    """Residuals of each feature after a linear fit on age, sex and ICV, at one centre (as the
    paper did, before federated standardization)."""
    design = np.column_stack([np.ones(len(age)), age, sex, icv])
    coef, *_ = np.linalg.lstsq(design, features, rcond=None)
    return features - design @ coef


def table(cohort: dict[str, dict[str, np.ndarray]]) -> list[dict[str, object]]:
    """The generated cohort's Table 1, to print next to the paper's."""
    rows = []
    for name, c in cohort.items():
        rows.append({"centre": name, "n": len(c["age"]), "male": int(c["sex"].sum()), "female": int((1 - c["sex"]).sum()),
                     "CN": int((c["group"] == "CN").sum()), "MCI": int((c["group"] == "MCI").sum()),
                     "AD": int((c["group"] == "AD").sum()), "age_mean": float(c["age"].mean()),
                     "age_sd": float(c["age"].std()), "age_min": float(c["age"].min()), "age_max": float(c["age"].max())})
    return rows
