"""DICOM series (dataset type `dicom`): one sub-folder per subject, one series per sub-folder.

Every file under a subject's folder is read with pydicom; a subject's slices form one volume:
one SeriesInstanceUID, sorted along the slice normal by ImagePositionPatient (InstanceNumber
where positions are absent), rescaled by RescaleSlope/RescaleIntercept. Refused at `dataset
add`, with the reason: a folder holding slices of more than one series (one volume per subject
is expected), slices that differ in size or orientation, repeated or unevenly spaced positions,
a file with a .dcm suffix that is not DICOM. Files without the suffix that are not DICOM (a
README, the demographics CSV) are skipped.

Only these tags are read into anything the node keeps or says: Modality, Rows, Columns,
PixelSpacing, ImagePositionPatient, ImageOrientationPatient, InstanceNumber, SliceThickness,
RescaleSlope/Intercept and the pixels; SeriesInstanceUID only to group slices. Patient tags
(PatientName, PatientID, PatientBirthDate, ...), dates, institutions and UIDs are never copied
into metadata, warnings, replies or updates. The modality a job selects is the series'
Modality tag (`MR`, `CT`, ...). Labels and covariates come from a demographics CSV keyed by the
subject folder's name, as for `medical-folder` (`node.loaders.medical`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from node.datasets import DatasetError
from node.loaders.medical import ImagingData, find_demographics, finish

MODALITY_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _read(file: Path, where: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(file))
    except InvalidDicomError:
        if file.suffix.lower() == ".dcm":
            raise DatasetError(f"{where} is not a DICOM file") from None
        return None
    except Exception:  # truncated or corrupt: pydicom's messages may quote element values
        raise DatasetError(f"{where} is not a readable DICOM file (corrupt or truncated)") from None


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _series_volume(subject: str, slices: list[tuple[str, Any]]) -> tuple[np.ndarray, list[float], str]:
    """One subject's slices as a volume (slices, rows, columns), its spacing and modality."""
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for _, ds in slices}
    if len(sizes) != 1:
        raise DatasetError(f"{subject}: its slices differ in size (an inconsistent series)")
    orientations = {tuple(round(v, 4) for v in (_floats(ds.get("ImageOrientationPatient"), 6) or [])) for _, ds in slices}
    if len(orientations) != 1:
        raise DatasetError(f"{subject}: its slices differ in orientation (an inconsistent series)")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) != 1 for _, ds in slices):
        raise DatasetError(f"{subject}: multi-frame DICOM files are not supported yet (one slice per file)")
    orient = next(iter(orientations))
    positions = [_floats(ds.get("ImagePositionPatient"), 3) for _, ds in slices]
    if len(orient) == 6 and all(p is not None for p in positions):
        normal = np.cross(orient[:3], orient[3:])
        keys = [float(np.dot(normal, p)) for p in positions]
    else:
        try:
            keys = [float(ds.InstanceNumber) for _, ds in slices]
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(f"{subject}: slices have neither ImagePositionPatient nor InstanceNumber") from None
    order = np.argsort(keys, kind="stable")
    ordered = np.asarray(keys)[order]
    steps = np.diff(ordered)
    if len(steps) and np.any(np.abs(steps) < 1e-6):
        raise DatasetError(f"{subject}: two slices share a position (duplicated or mixed series)")
    if len(steps) and np.ptp(steps) > max(0.01, 0.05 * float(np.median(steps))):
        raise DatasetError(f"{subject}: slices are unevenly spaced (missing slices or an inconsistent series)")
    planes = []
    for i in order:
        where, ds = slices[i]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception:
            raise DatasetError(f"{where}: its pixel data cannot be decoded") from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels * slope + intercept)
    volume = np.ascontiguousarray(np.stack(planes))
    ds0 = slices[0][1]
    pixel = _floats(ds0.get("PixelSpacing"), 2) or [1.0, 1.0]
    if len(steps):
        through = float(np.median(steps))
    else:
        through = float(ds0.get("SliceThickness", 1.0) or 1.0)
    modality = str(ds0.get("Modality", "") or "").strip().upper()
    if not modality or not set(modality) <= MODALITY_NAME_CHARS or len(modality) > 16:
        modality = "IMAGE"
    return volume, [through, *pixel], modality


def load_dicom(path: Path, demographics: Path | None) -> ImagingData:
    """Read every subject's series (see the module doc) and the demographics table."""
    if not path.is_dir():
        raise DatasetError(f"{path} must be a folder with one sub-folder of DICOM files per subject")
    if any(f.is_file() and f.suffix.lower() == ".dcm" for f in path.iterdir()):
        raise DatasetError(f"{path}: DICOM files lie in the dataset folder itself; put each subject's series in "
                           "its own sub-folder")
    volumes: dict[str, dict[str, np.ndarray]] = {}
    spacing: dict[str, dict[str, list[float]]] = {}
    subjects: list[str] = []
    for folder in sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")):
        by_series: dict[str, list[tuple[str, Any]]] = {}
        for file in sorted(f for f in folder.rglob("*") if f.is_file()):
            where = f"{folder.name}/{file.relative_to(folder)}"
            ds = _read(file, where)
            if ds is None:
                continue
            if "PixelData" not in ds:
                continue  # a DICOMDIR, a structured report: no image
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                raise DatasetError(f"{where} has no SeriesInstanceUID")
            by_series.setdefault(uid, []).append((where, ds))
        if not by_series:
            continue
        if len(by_series) > 1:
            raise DatasetError(f"{folder.name}: holds slices of {len(by_series)} different series where one volume "
                               "per subject folder is expected (mixed series)")
        volume, zooms, modality = _series_volume(folder.name, next(iter(by_series.values())))
        volumes.setdefault(modality, {})[folder.name] = volume
        spacing.setdefault(modality, {})[folder.name] = zooms
        subjects.append(folder.name)
    if not subjects:
        raise DatasetError(f"{path}: no sub-folder holds DICOM images")
    return finish(subjects, volumes, spacing, find_demographics(path, demographics), [], source="dicom")
