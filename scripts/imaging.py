"""Synthetic 3-D imaging cohorts for demos and tests: NIfTI subject folders and DICOM series.

Two classes differ by a structure: a bright sphere (`control`) or a bright cube (`case`) of
about the same volume, at a random place, in a noisy background. Each site is its own "scanner":
an intensity offset and gain of its own (and for DICOM a RescaleIntercept of its own). A
demographics CSV has the subject column, age (a little higher for cases), sex and diagnosis.
DICOM files carry made-up patient tags (PatientName, PatientID, PatientBirthDate) so tests can
check they never leave the node (`PATIENT_MARKERS`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CLASSES = ("control", "case")
# per site: (intensity offset, gain): different scanners
SCANNERS = {"site-1": (0.0, 1.0), "site-2": (300.0, 2.5), "site-3": (-50.0, 0.6)}
PATIENT_MARKERS = ("Doe^Jane", "MRN-4711", "19450317")


def volume(label: int, size: int, rng: np.random.Generator, offset: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """One volume: a sphere (label 0) or a cube (label 1) brighter than a noisy background."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).astype(np.float32)
    radius = rng.uniform(0.22, 0.3) * size
    center = rng.uniform(radius + 1, size - radius - 1, size=3).astype(np.float32)
    rel = grid - center[:, None, None, None]
    if label == 0:
        inside = np.sqrt((rel**2).sum(0)) <= radius
    else:
        inside = np.abs(rel).max(0) <= radius * 0.806  # a cube of the sphere's volume
    vol = rng.normal(100.0, 15.0, size=(size,) * 3) + inside * rng.uniform(80.0, 120.0)
    return (vol * gain + offset).astype(np.float32)


def demographics(subjects: list[str], labels: list[int], rng: np.random.Generator) -> list[list[str]]:
    rows = []
    for s, lab in zip(subjects, labels, strict=True):
        age = rng.normal(68 + 6 * lab, 6)
        rows.append([s, f"{age:.0f}", str(rng.choice(["F", "M"])), CLASSES[lab]])
    return rows


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "age", "sex", "diagnosis"])
        writer.writerows(rows)


def write_medical_folder(folder: Path, n: int, seed: int, *, site: str = "site-1", size: int = 16,
                         modalities: tuple[str, ...] = ("T1", "FLAIR")) -> Path:
    """`n` subjects `sub-XXX/{T1,FLAIR}.nii.gz` + demographics.csv; FLAIR has inverted contrast."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    offset, gain = SCANNERS.get(site, (0.0, 1.0))
    folder.mkdir(parents=True, exist_ok=True)
    subjects, labels = [], []
    for i in range(n):
        subject, label = f"sub-{seed:02d}{i:03d}", int(i % 2)
        vol = volume(label, size, rng, offset, gain)
        (folder / subject).mkdir(exist_ok=True)
        affine = np.diag([1.2, 1.0, 1.0, 1.0])
        for mod in modalities:
            data = vol if mod != "FLAIR" else (vol.max() + vol.min() - vol)
            nib.save(nib.Nifti1Image(data, affine), str(folder / subject / f"{mod}.nii.gz"))
        subjects.append(subject)
        labels.append(label)
    _write_csv(folder / "demographics.csv", demographics(subjects, labels, rng))
    return folder


def dicom_slice(pixels: np.ndarray, z: int, *, series_uid: str, study_uid: str, intercept: float,
                patient: int, instance: int):
    """One MR slice as a pydicom Dataset with made-up patient tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName = f"{PATIENT_MARKERS[0]}{patient}"
    ds.PatientID = f"{PATIENT_MARKERS[1]}-{patient}"
    ds.PatientBirthDate = PATIENT_MARKERS[2]
    ds.PatientSex = "F"
    ds.InstitutionName = "St Elsewhere"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(z) * 2.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_dicom_series(folder: Path, vol: np.ndarray, *, patient: int, intercept: float = 0.0,
                       shuffle: np.random.Generator | None = None) -> None:
    """One series, one file per slice (written in shuffled order: the loader must sort)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    order = list(range(len(vol)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for k, z in enumerate(order):
        pixels = np.clip(vol[z] - intercept, 0, 65535)
        ds = dicom_slice(pixels, z, series_uid=series, study_uid=study, intercept=intercept, patient=patient,
                         instance=z + 1)
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)


def write_dicom_folder(folder: Path, n: int, seed: int, *, site: str = "site-1", size: int = 16) -> Path:
    """`n` subjects `SUBJ/IMxxxx.dcm` (one MR series each) + demographics.csv."""
    rng = np.random.default_rng(seed)
    offset, gain = SCANNERS.get(site, (0.0, 1.0))
    subjects, labels = [], []
    for i in range(n):
        subject, label = f"sub-{seed:02d}{i:03d}", int(i % 2)
        vol = volume(label, size, rng, offset + 200.0, gain)  # positive for uint16 storage
        write_dicom_series(folder / subject, vol, patient=seed * 1000 + i, intercept=-100.0 * (seed % 3),
                           shuffle=rng)
        subjects.append(subject)
        labels.append(label)
    _write_csv(folder / "demographics.csv", demographics(subjects, labels, rng))
    return folder
