"""Reading a site's data files: csv, npy/npz, idx (MNIST format), image folders, tables, and
medical images (NIfTI subject folders, DICOM series: `node.loaders.medical`, `node.loaders.dicom`).

Every loader returns float32 features `x` (N, ...) and optional labels `y`, and refuses a bad
file with a `DatasetError` that says what is wrong. Images (idx, image folders, uint8 arrays)
come as (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import csv
import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

TYPES = ("csv", "npy", "npz", "idx", "images", "table", "medical-folder", "dicom")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}

if TYPE_CHECKING:
    import torch


class DatasetError(ValueError):
    """A dataset that cannot be registered or read; the message says why."""


@dataclass
class LoadedData:
    x: torch.Tensor
    y: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)


def _images_from_uint8(arr: np.ndarray) -> torch.Tensor:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)


def _meta(x: torch.Tensor, y: torch.Tensor | None, **extra: Any) -> dict[str, Any]:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    meta: dict[str, Any] = {"n_samples": int(len(x)), "shape": [int(d) for d in x.shape[1:]], **extra}
    if y is not None:
        classes = torch.unique(y)
        integral = bool(torch.all(classes == classes.round())) if y.is_floating_point() else True
        if integral and len(classes) <= 1000:
            meta["n_classes"] = int(classes.max().item()) + 1 if len(classes) else 0
    return meta


# --- csv -------------------------------------------------------------------------------------


def load_csv(path: Path, target: str | None) -> LoadedData:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path} is empty") from None
        rows = [row for row in reader if row]
    if not rows:
        raise DatasetError(f"{path} has a header but no rows")
    # errors name rows and columns by position, never by content: pointed at a file that is
    # not a CSV (a key, a password file), the message must not show what it holds
    if target is not None and target not in header:
        raise DatasetError(f"target column {target!r} is not in the header of {path.name} ({len(header)} columns)")
    try:
        table = np.array(rows, dtype=np.float32)
    except ValueError:
        bad = next(((n, i) for n, r in enumerate(rows, start=2) for i in range(len(r)) if not _is_number(r[i])), None)
        if bad is None:
            raise DatasetError(f"{path.name}: rows do not all have {len(header)} columns") from None
        raise DatasetError(
            f"{path.name}: every column must be numeric; line {bad[0]}, column {bad[1] + 1} is not a number "
            "(clinical tables with categories or missing values: --type table)"
        ) from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise DatasetError(f"{path.name}: rows do not all have {len(header)} columns")
    features = [h for h in header if h != target]
    cols = [header.index(h) for h in features]
    x = torch.from_numpy(np.ascontiguousarray(table[:, cols]))
    y = torch.from_numpy(table[:, header.index(target)].copy()) if target else None
    return LoadedData(x, y, _meta(x, y, features=features, target=target))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- npy / npz -------------------------------------------------------------------------------


def _array_to_x(arr: np.ndarray) -> torch.Tensor:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    if arr.dtype == np.uint8:
        return _images_from_uint8(arr)
    if not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(f"array of dtype {arr.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def load_npy(path: Path) -> LoadedData:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path.name} is not a readable .npy file: {exc}") from None
    x = _array_to_x(arr)
    return LoadedData(x, None, _meta(x, None))


def load_npz(path: Path) -> LoadedData:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path.name} is not a readable .npz file: {exc}") from None
    xk = next((k for k in ("x", "X", "features", "images") if k in arrays), None)
    if xk is None:
        raise DatasetError(f"{path.name} needs an array named x (found: {', '.join(arrays) or 'none'})")
    x = _array_to_x(arrays[xk])
    yk = next((k for k in ("y", "Y", "labels", "targets") if k in arrays), None)
    y = torch.from_numpy(np.ascontiguousarray(arrays[yk])) if yk else None
    if y is not None and len(y) != len(x):
        raise DatasetError(f"{path.name}: {len(x)} samples but {len(y)} labels")
    return LoadedData(x, y, _meta(x, y))


# --- idx (MNIST / Fashion-MNIST) -------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path.name} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DatasetError(f"{path.name}: header says {dims} but the file holds {arr.size} values")
    return arr.reshape(dims)


def idx_labels_for(images: Path) -> Path | None:
    """The labels file beside an images file (…-images-idx3-ubyte -> …-labels-idx1-ubyte)."""
    name = images.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    candidate = images.with_name(name)
    return candidate if candidate != images and candidate.exists() else None


def load_idx(path: Path, labels: Path | None) -> LoadedData:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    images = read_idx(path)
    if images.ndim != 3:
        raise DatasetError(f"{path.name}: expected images (3-D IDX), got {images.ndim}-D")
    x = _images_from_uint8(images)
    labels = labels or idx_labels_for(path)
    y = None
    if labels is not None:
        lab = read_idx(labels)
        if lab.shape != (len(images),):
            raise DatasetError(f"{labels.name}: {lab.shape[0]} labels for {len(images)} images")
        y = torch.from_numpy(lab.astype(np.int64))
    return LoadedData(x, y, _meta(x, y, labels=str(labels) if labels else None))


# --- image folders ---------------------------------------------------------------------------


def load_images(path: Path) -> LoadedData:
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    from PIL import Image  # Pillow comes with matplotlib

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{path} has no class sub-folders (expected one folder per class)")
    arrays, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((path / cls).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    arrays.append(np.asarray(img.convert("L" if img.mode in ("L", "1", "P") else "RGB")))
            except OSError as exc:
                raise DatasetError(f"cannot read image {file}: {exc}") from None
            labels.append(label)
    if not arrays:
        raise DatasetError(f"{path}: the class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len({a.shape for a in arrays}) != 1:
        raise DatasetError(f"{path}: images differ in size; resize them to one size first")
    x = _images_from_uint8(np.stack(arrays))
    y = torch.tensor(labels, dtype=torch.int64)
    return LoadedData(x, y, _meta(x, y, classes=classes))


# --- entry point -----------------------------------------------------------------------------


def load(kind: str, path: str | Path, *, target: str | None = None, labels: str | Path | None = None) -> LoadedData:
    """Load a dataset of `kind` from `path`; DatasetError if it cannot be used."""
    path = Path(path).expanduser()
    if kind not in TYPES:
        raise DatasetError(f"unknown dataset type {kind!r}; expected one of {', '.join(TYPES)}")
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    if kind in ("medical-folder", "dicom"):  # folders; `labels`: the demographics CSV, if not inside
        from node.loaders.dicom import load_dicom
        from node.loaders.medical import load_medical_folder

        demographics = Path(labels).expanduser() if labels else None
        return (load_dicom if kind == "dicom" else load_medical_folder)(path, demographics)
    if kind == "images":
        if not path.is_dir():
            raise DatasetError(f"{path} must be a folder with one sub-folder per class")
        return load_images(path)
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    if kind == "csv":
        return load_csv(path, target)
    if kind == "table":
        from node.loaders.tabular import load_table

        return load_table(path, target)
    if kind == "npy":
        return load_npy(path)
    if kind == "npz":
        return load_npz(path)
    return load_idx(path, Path(labels).expanduser() if labels else None)
