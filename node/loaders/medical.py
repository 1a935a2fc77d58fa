"""Medical images: NIfTI subject folders (dataset type `medical-folder`) and what every imaging
dataset shares with DICOM (`node.loaders.dicom`): volumes per modality and subject, a
demographics table, and the job's selection of both.

A `medical-folder` is one sub-folder per subject with one NIfTI file per modality
(`SUBJ/T1.nii.gz`, `SUBJ/FLAIR.nii`), plus a demographics CSV (`demographics.csv` in the folder,
or `--labels FILE`) whose `subject` column (or `subject_id`, `participant_id`) names the
sub-folders. At `dataset add` every volume is read once (a corrupt file is refused), and the
subjects that lack a modality or a CSV row are reported to the steward (`warnings`).

What researchers see (`meta["imaging"]`, `meta["columns"]`): the modalities with their shapes,
voxel spacings and subject counts, and the demographics columns profiled as for a clinical table
(`node.loaders.tabular`: kinds, missing counts, categories held by at least 5 rows). Never a
subject name, a file name or a value that identifies a patient; the subject column is dropped.

A job selects by name (`training_args`): `modalities` (default: all), `label` (a demographics
column; `classes` lists a string label's classes in order), `covariates` (numeric columns,
missing values filled with this site's mean, optionally `covariate_scale: {col: [center, scale]}`),
`spatial_size` ([D, H, W]: volumes resized trilinearly; needed when shapes differ). The job sees
`x` (N, C, D, H, W), or with covariates (N, C*D*H*W + K), the flattened volumes then the
covariates (`common.training.imaging.split_input` undoes it); subjects without every selected
modality or without a label are left out (the metric `subjects_left_out`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.datasets import DatasetError, LoadedData
from node.loaders.tabular import MISSING, column_profile, read_table

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEMOGRAPHICS_FILES = ("demographics.csv", "participants.csv")
SUBJECT_COLUMNS = ("subject", "subject_id", "participant_id")
MAX_LISTED = 10  # subjects named in one warning line


@dataclass
class ImagingData(LoadedData):
    """Volumes by modality and subject, and the demographics cells aligned with `subjects`."""

    subjects: list[str] = field(default_factory=list)
    volumes: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    cells: dict[str, list[str | None]] = field(default_factory=dict)
    prepared: dict[str, LoadedData] = field(default_factory=dict)  # per-selection memo


class SelectionError(ValueError):
    """A job's selection does not fit this dataset; the message names columns and modalities only."""


# --- demographics ----------------------------------------------------------------------------


def find_demographics(folder: Path, given: Path | None) -> Path | None:
    if given is not None:
        if not given.is_file():
            raise DatasetError(f"the demographics file {given} does not exist")
        return given
    return next((folder / n for n in DEMOGRAPHICS_FILES if (folder / n).is_file()), None)


def read_demographics(path: Path, subjects: list[str]) -> tuple[dict[str, list[str | None]], list[str], int]:
    """Cells per column aligned with `subjects` (None: missing or no row), the subjects without
    a row, and how many rows name no subject here. Errors name lines and columns by position."""
    header, rows = read_table(path)
    lowered = [h.strip().lower() for h in header]
    key = next((lowered.index(c) for c in SUBJECT_COLUMNS if c in lowered), None)
    if key is None:
        raise DatasetError(f"{path.name} has no subject column (a column named {', '.join(SUBJECT_COLUMNS)}; "
                           f"its header has {len(header)} columns)")
    by_subject: dict[str, list[str]] = {}
    for line, row in enumerate(rows, start=2):
        sid = row[key].strip()
        if not sid:
            raise DatasetError(f"{path.name}: line {line} has an empty subject cell")
        if sid in by_subject:
            raise DatasetError(f"{path.name}: line {line} repeats a subject of an earlier line")
        by_subject[sid] = row
    cells = {h: [None if s not in by_subject or by_subject[s][i].strip().lower() in MISSING
                 else by_subject[s][i].strip() for s in subjects]
             for i, h in enumerate(header) if i != key}
    without = [s for s in subjects if s not in by_subject]
    extra = sum(1 for s in by_subject if s not in set(subjects))
    return cells, without, extra


def _columns(cells: dict[str, list[str | None]], subjects: list[str]) -> dict[str, dict[str, Any]]:
    return {h: column_profile(v) for h, v in cells.items()}


# --- NIfTI subject folders ---------------------------------------------------------------------


def _modality_of(file: Path) -> str | None:
    name = file.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def read_nifti(file: Path, where: str) -> tuple[np.ndarray, list[float]]:
    """The volume (float32, 3-D) and its voxel spacing; DatasetError without quoting the file."""
    import nibabel as nib

    try:
        img = nib.load(str(file))
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception:  # nibabel raises many kinds; its messages may quote header bytes
        raise DatasetError(f"{where} is not a readable NIfTI image (corrupt or truncated)") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{where}: expected a 3-D volume, found {data.ndim} dimensions")
    if not np.isfinite(data).all():
        raise DatasetError(f"{where}: the volume holds NaN or infinite voxels")
    return np.ascontiguousarray(data), zooms


def modality_summary(volumes: dict[str, dict[str, np.ndarray]], spacing: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per modality: subject count, shape(s), voxel spacing(s): what researchers may see."""
    out: dict[str, Any] = {}
    for mod in sorted(volumes):
        shapes = sorted({tuple(int(d) for d in v.shape) for v in volumes[mod].values()})
        spacings = sorted({tuple(round(z, 3) for z in s) for s in spacing[mod].values()})
        entry: dict[str, Any] = {"subjects": len(volumes[mod])}
        entry.update({"shape": list(shapes[0])} if len(shapes) == 1 else {"shapes": [list(s) for s in shapes[:MAX_LISTED]]})
        entry.update({"spacing": list(spacings[0])} if len(spacings) == 1
                     else {"spacings": [list(s) for s in spacings[:MAX_LISTED]]})
        out[mod] = entry
    return out


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def finish(subjects: list[str], volumes: dict[str, dict[str, np.ndarray]], spacing: dict[str, dict[str, list[float]]],
           demographics: Path | None, warnings: list[str], **extra: Any) -> ImagingData:
    """The ImagingData and its metadata, shared by the NIfTI and DICOM loaders."""
    cells: dict[str, list[str | None]] = {}
    if demographics is not None:
        cells, without, unmatched = read_demographics(demographics, subjects)
        if len(without) == len(subjects):
            raise DatasetError(f"{demographics.name}: no row names a subject of this dataset "
                               f"({len(subjects)} subject folders)")
        if without:
            warnings.append(f"{len(without)} subject(s) have no row in {demographics.name}: {_listed(without)}")
        if unmatched:
            warnings.append(f"{unmatched} row(s) of {demographics.name} name no subject folder here")
    else:
        warnings.append("no demographics table: jobs can use the images only, without labels")
    for mod in sorted(volumes):
        lacking = [s for s in subjects if s not in volumes[mod]]
        if lacking:
            warnings.append(f"{len(lacking)} subject(s) lack {mod}: {_listed(lacking)}")
    imaging = modality_summary(volumes, spacing)
    complete = sum(all(s in volumes[m] for m in volumes) for s in subjects)
    meta: dict[str, Any] = {"n_samples": len(subjects), "features": sorted(volumes),
                            "imaging": {"modalities": imaging, "subjects": len(subjects),
                                        "complete_subjects": complete, **extra},
                            "columns": _columns(cells, subjects), "warnings": warnings}
    if all("shape" in e for e in imaging.values()) and len({tuple(e["shape"]) for e in imaging.values()}) == 1:
        meta["shape"] = [len(imaging), *next(iter(imaging.values()))["shape"]]
    if demographics is not None:
        meta["demographics"] = str(demographics)
    return ImagingData(x=torch.zeros(len(subjects), 0), y=None, meta=meta, subjects=subjects, volumes=volumes,
                       cells=cells)


def load_medical_folder(path: Path, demographics: Path | None) -> ImagingData:
    """Read every subject's NIfTI modalities and the demographics table (see the module doc)."""
    if not path.is_dir():
        raise DatasetError(f"{path} must be a folder with one sub-folder per subject")
    subjects = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    volumes: dict[str, dict[str, np.ndarray]] = {}
    spacing: dict[str, dict[str, list[float]]] = {}
    for subject in subjects:
        for file in sorted((path / subject).iterdir()):
            mod = _modality_of(file)
            if mod is None or not file.is_file():
                continue
            data, zooms = read_nifti(file, f"{subject}/{file.name}")
            volumes.setdefault(mod, {})[subject] = data
            spacing.setdefault(mod, {})[subject] = zooms
    subjects = [s for s in subjects if any(s in v for v in volumes.values())]
    if not subjects:
        raise DatasetError(f"{path}: no subject folder holds a NIfTI file ({', '.join(NIFTI_SUFFIXES)})")
    return finish(subjects, volumes, spacing, find_demographics(path, demographics), [])


# --- the job's selection (in the training process) ----------------------------------------------


def _resize(vol: np.ndarray, size: tuple[int, ...]) -> torch.Tensor:
    t = torch.from_numpy(vol)[None, None]
    if tuple(vol.shape) == size:
        return t[0, 0]
    return torch.nn.functional.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0]


def _numbers(cells: list[str | None], name: str) -> np.ndarray:
    try:
        return np.array([np.nan if v is None else float(v) for v in cells], dtype=np.float64)
    except ValueError:
        raise SelectionError(f"column {name!r} is not numeric here") from None


def select(data: ImagingData, targs: dict[str, Any]) -> LoadedData:
    """The volumes, covariates and labels the job asked for (see the module doc)."""
    available = sorted(data.volumes)
    modalities = list(targs.get("modalities") or available)
    for mod in modalities:
        if mod not in data.volumes:
            raise SelectionError(f"this dataset has no modality {mod!r} (it has {', '.join(available)})")
    label, covariates = targs.get("label"), list(targs.get("covariates") or [])
    for name in ([label] if label else []) + covariates:
        if name not in data.cells:
            raise SelectionError(f"the demographics table has no column {name!r}")
    keep = np.array([all(s in data.volumes[m] for m in modalities) for s in data.subjects])
    y = None
    if label:
        cells = data.cells[label]
        if targs.get("classes") is not None:
            index = {str(c): i for i, c in enumerate(targs["classes"])}
            codes = np.array([np.nan if v is None or v not in index else index[v] for v in cells])
        else:
            codes = _numbers(cells, label)
        keep &= ~np.isnan(codes)
        integral = targs.get("classes") is not None or np.all(codes[keep] == np.round(codes[keep]))
        y = torch.from_numpy(codes[keep].astype(np.int64 if integral and targs.get("task") != "regression"
                                                else np.float32))
    subjects = [s for s, k in zip(data.subjects, keep, strict=True) if k]
    if not subjects:
        raise SelectionError("no subject has every selected modality and a label")
    shapes = {tuple(data.volumes[m][s].shape) for m in modalities for s in subjects}
    size = tuple(int(d) for d in targs["spatial_size"]) if targs.get("spatial_size") else None
    if size is None and len(shapes) > 1:
        raise SelectionError("the selected volumes differ in shape: the job must give spatial_size [D, H, W]")
    size = size or next(iter(shapes))
    x = torch.stack([torch.stack([_resize(data.volumes[m][s], size) for m in modalities]) for s in subjects])
    if covariates:
        scale = targs.get("covariate_scale") or {}
        cols = []
        for name in covariates:
            col = _numbers(data.cells[name], name)[keep]
            present = col[~np.isnan(col)]
            col = np.where(np.isnan(col), present.mean() if len(present) else 0.0, col)
            center, width = scale.get(name, (0.0, 1.0))
            cols.append((col - center) / (width or 1.0))
        cov = torch.from_numpy(np.stack(cols, axis=1).astype(np.float32))
        x = torch.cat([x.flatten(1), cov], dim=1)
    meta = {"n_samples": len(subjects), "shape": list(x.shape[1:]), "modalities": modalities,
            "job_metrics": {"subjects_left_out": float(len(data.subjects) - len(subjects))}}
    return LoadedData(x.contiguous(), y, meta)


def prepare(data: ImagingData, targs: dict[str, Any]) -> LoadedData:
    """`select`, remembered per selection (a round then costs only training)."""
    key = json.dumps([targs.get(k) for k in ("modalities", "label", "classes", "covariates", "covariate_scale",
                                             "spatial_size", "task")], sort_keys=True, default=str)
    if key not in data.prepared:
        data.prepared.clear()
        data.prepared[key] = select(data, targs)
    return data.prepared[key]
