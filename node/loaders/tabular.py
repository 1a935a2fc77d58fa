"""Clinical tables: CSV files with numeric, categorical and missing values (dataset type `table`).

At `dataset add` every column is profiled once: numeric, categorical (with its categories and
how many rows hold each), or dropped (dates, free text, identifiers: too many distinct values).
The steward sees all of it; researchers see only categories held by at least
`MIN_PUBLIC_COUNT` rows, so a rare diagnosis does not single a patient out.

A job says how to encode (`training_args.encoding`, see `Encoding`) with the category lists the
researcher gathered from every site's public metadata, so every site builds the same columns
in the same order. Errors name lines and columns by position, never by content: pointed at a
file that is not a table (a key, a password file), a message must not show what it holds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node.datasets import DatasetError, LoadedData, _is_number

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
MIN_PUBLIC_COUNT = 5  # categories with fewer rows are not shown to researchers
MAX_CATEGORIES = 50  # more distinct non-numeric values: free text or an identifier, dropped
_DATE = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}([ T].*)?$|^\d{1,2}/\d{1,2}/\d{2,4}$")

if TYPE_CHECKING:
    import torch


@dataclass
class TableData(LoadedData):
    """A profiled table before encoding: raw cells per column (None where missing)."""

    cells: dict[str, list[str | None]] = field(default_factory=dict)
    encoded: dict[str, LoadedData] = field(default_factory=dict)  # per-encoding memo


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows; DatasetError (by position only) for an empty or ragged file."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        where = f" near line {exc.line_num}" if hasattr(exc, "line_num") else ""
        raise DatasetError(f"{path.name} is not a UTF-8 CSV table{where}") from None
    if not header:
        raise DatasetError(f"{path.name} is empty")
    if not rows:
        raise DatasetError(f"{path.name} has a header but no rows")
    if len(set(header)) != len(header) or any(not h.strip() for h in header):
        raise DatasetError(f"{path.name}: the header has empty or repeated column names")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DatasetError(f"{path.name}: line {line} has {len(row)} fields, the header has {len(header)}")
    return header, rows


def column_profile(values: list[str | None]) -> dict[str, Any]:
    """What a column is: numeric, categorical (categories -> row counts), or dropped (and why)."""
    present = [v for v in values if v is not None]
    profile: dict[str, Any] = {"missing": len(values) - len(present)}
    if not present:
        return {**profile, "kind": "dropped", "why": "empty"}
    if all(_is_number(v) for v in present):
        return {**profile, "kind": "numeric"}
    if sum(bool(_DATE.match(v)) for v in present) > len(present) / 2:
        return {**profile, "kind": "dropped", "why": "date"}
    counts: dict[str, int] = {}
    for v in present:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) > MAX_CATEGORIES or (len(present) >= 20 and len(counts) > len(present) / 2):
        return {**profile, "kind": "dropped", "why": "too many distinct values (text or identifier)"}
    return {**profile, "kind": "categorical", "categories": dict(sorted(counts.items()))}


def public_columns(columns: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The column profile researchers may see: rare categories (< MIN_PUBLIC_COUNT rows) left out."""
    out: dict[str, dict[str, Any]] = {}
    for name, prof in columns.items():
        entry: dict[str, Any] = {"kind": prof["kind"], "missing": int(prof.get("missing", 0))}
        if prof["kind"] == "categorical":
            cats = prof["categories"]
            entry["categories"] = sorted(c for c, n in cats.items() if n >= MIN_PUBLIC_COUNT)
            entry["suppressed"] = sum(1 for n in cats.values() if n < MIN_PUBLIC_COUNT)
        out[name] = entry
    return out


def load_table(path: Path, target: str | None) -> TableData:
    """Read and profile a table; the target (if any) must be present and not dropped."""
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    header, rows = read_table(path)
    if target is not None and target not in header:
        raise DatasetError(f"target column {target!r} is not in the header of {path.name} ({len(header)} columns)")
    cells = {h: [None if r[i].strip().lower() in MISSING else r[i].strip() for r in rows] for i, h in enumerate(header)}
    columns = {h: column_profile(v) for h, v in cells.items()}
    if target is not None and columns[target]["kind"] == "dropped":
        pos = header.index(target) + 1
        raise DatasetError(f"{path.name}: the target (column {pos}) is {columns[target].get('why', 'unusable')}")
    features = [h for h in header if h != target and columns[h]["kind"] != "dropped"]
    if not features:
        raise DatasetError(f"{path.name}: no usable feature column (all are dates, text or empty)")
    meta: dict[str, Any] = {"n_samples": len(rows), "shape": [len(features)], "features": features,
                            "target": target, "columns": columns}
    if target is not None:
        meta["target_missing"] = columns[target]["missing"]
        if columns[target]["kind"] == "categorical":
            meta["n_classes"] = sum(n >= MIN_PUBLIC_COUNT for n in columns[target]["categories"].values())
    return TableData(x=torch.zeros(len(rows), 0), y=None, meta=meta, cells=cells)


# --- encoding (in the training process, as the job says) --------------------------------------


class EncodingError(ValueError):
    """A job's encoding does not fit this table; the message names columns, never cell values."""


@dataclass(frozen=True)
class Encoding:
    """How a job turns a table into features: `training_args.encoding`.

    numeric: columns used as numbers (default: every numeric feature of the table);
    one_hot: column -> categories, one 0/1 column each (a value not listed: all zeros);
    ordinal: column -> ordered categories, coded 0..k-1;
    impute: how missing numbers (and ordinal codes) are filled: mean, median or most_frequent,
    from this site's own rows; scale: column -> [center, scale], applied after imputing;
    classes: the target's classes in order (a string target needs them; rows whose label
    is missing or not listed are left out).
    """

    numeric: tuple[str, ...] | None = None
    one_hot: dict[str, list[str]] = field(default_factory=dict)
    ordinal: dict[str, list[str]] = field(default_factory=dict)
    impute: str = "mean"
    scale: dict[str, list[float]] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None

    @classmethod
    def of(cls, training_args: dict[str, Any]) -> Encoding:
        raw = dict(training_args.get("encoding") or {})
        unknown = set(raw) - {"numeric", "one_hot", "ordinal", "impute", "scale", "classes"}
        if unknown:
            raise EncodingError(f"unknown encoding keys: {', '.join(sorted(unknown))}")
        if raw.get("impute", "mean") not in ("mean", "median", "most_frequent"):
            raise EncodingError("encoding.impute must be mean, median or most_frequent")
        return cls(numeric=tuple(raw["numeric"]) if raw.get("numeric") is not None else None,
                   one_hot={k: [str(c) for c in v] for k, v in (raw.get("one_hot") or {}).items()},
                   ordinal={k: [str(c) for c in v] for k, v in (raw.get("ordinal") or {}).items()},
                   impute=raw.get("impute", "mean"), scale=dict(raw.get("scale") or {}),
                   classes=tuple(str(c) for c in raw["classes"]) if raw.get("classes") is not None else None)

    def key(self) -> str:
        return json.dumps([self.numeric, self.one_hot, self.ordinal, self.impute, self.scale, self.classes],
                          sort_keys=True)


def feature_names(enc: Encoding, numeric: list[str]) -> list[str]:
    """The encoded columns, in order: numeric, then one-hot `col=category`, then ordinal."""
    return [*numeric, *(f"{c}={v}" for c, cats in enc.one_hot.items() for v in cats), *enc.ordinal]


def encoding_digest(names: list[str]) -> int:
    """A 32-bit fingerprint of the encoded column list (sites report it; equal means aligned)."""
    return int(hashlib.sha256("\x1f".join(names).encode()).hexdigest()[:8], 16)


def _fill(column: np.ndarray, how: str) -> np.ndarray:
    missing = np.isnan(column)
    if not missing.any():
        return column
    present = column[~missing]
    if not len(present):
        value = 0.0
    elif how == "median":
        value = float(np.median(present))
    elif how == "most_frequent":
        vals, counts = np.unique(present, return_counts=True)
        value = float(vals[np.argmax(counts)])
    else:
        value = float(present.mean())
    return np.where(missing, value, column)


def _numbers(cells: list[str | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in cells], dtype=np.float64)


def _codes(cells: list[str | None], cats: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(cats)}
    return np.array([np.nan if v is None or v not in index else index[v] for v in cells], dtype=np.float64)


def _check_columns(table: TableData, enc: Encoding, numeric: list[str]) -> None:
    columns = table.meta["columns"]
    target = table.meta.get("target")
    for name in [*numeric, *enc.one_hot, *enc.ordinal]:
        if name not in columns or name == target:
            raise EncodingError(f"the encoding names column {name!r}, which this table has not (as a feature)")
        if name in numeric and columns[name]["kind"] != "numeric":
            raise EncodingError(f"column {name!r} is {columns[name]['kind']} here, not numeric")
    for name in enc.scale:
        if name not in numeric:
            raise EncodingError(f"encoding.scale names {name!r}, which is not an encoded numeric column")


def _labels(table: TableData, enc: Encoding) -> tuple[torch.Tensor | None, np.ndarray]:
    """The target as class indices or floats, and which rows keep a usable label."""
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    target = table.meta.get("target")
    n = len(table.x)
    if target is None:
        return None, np.ones(n, dtype=bool)
    cells = table.cells[target]
    if enc.classes is not None:
        codes = _codes(cells, list(enc.classes))
        keep = ~np.isnan(codes)
        return torch.from_numpy(codes[keep].astype(np.int64)), keep
    if table.meta["columns"][target]["kind"] != "numeric":
        raise EncodingError("the target is categorical here: the job must list its classes (encoding.classes)")
    values = _numbers(cells)
    keep = ~np.isnan(values)
    return torch.from_numpy(values[keep].astype(np.float32)), keep


def encode(table: TableData, enc: Encoding) -> LoadedData:
    """The table as float features (N, F) and labels, exactly as `enc` says."""
    import torch  # noqa: PLC0415 - only where data is loaded (a training process)
    columns = table.meta["columns"]
    target = table.meta.get("target")
    numeric = list(enc.numeric) if enc.numeric is not None else [
        h for h in table.meta["features"] if columns[h]["kind"] == "numeric"]
    if enc.numeric is None and not enc.one_hot and not enc.ordinal:
        categorical = [h for h in table.meta["features"] if columns[h]["kind"] == "categorical" and h != target]
        if categorical:
            raise EncodingError(f"this table has {len(categorical)} categorical column(s): the job must say "
                                "how to encode them (training_args.encoding: one_hot / ordinal)")
    _check_columns(table, enc, numeric)
    parts: list[np.ndarray] = []
    for name in numeric:
        col = _fill(_numbers(table.cells[name]), enc.impute)
        center, scale = enc.scale.get(name, (0.0, 1.0))
        parts.append(((col - center) / (scale or 1.0))[:, None])
    for name, cats in enc.one_hot.items():
        codes = _codes(table.cells[name], cats)
        onehot = np.zeros((len(codes), len(cats)))
        rows = ~np.isnan(codes)
        onehot[np.nonzero(rows)[0], codes[rows].astype(int)] = 1.0
        parts.append(onehot)
    for name, cats in enc.ordinal.items():
        parts.append(_fill(_codes(table.cells[name], cats), enc.impute)[:, None])
    y, keep = _labels(table, enc)
    x = np.concatenate(parts, axis=1) if parts else np.zeros((len(keep), 0))
    names = feature_names(enc, numeric)
    meta = {"n_samples": int(keep.sum()), "shape": [len(names)], "encoded_features": names,
            "job_metrics": {"encoded_width": float(len(names)), "encoding_digest": float(encoding_digest(names)),
                            "rows_without_label": float((~keep).sum())}}
    return LoadedData(torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32)), y, meta)


def prepare(table: TableData, training_args: dict[str, Any]) -> LoadedData:
    """`encode` with the job's encoding, remembered per encoding (a round costs only training)."""
    enc = Encoding.of(training_args)
    key = enc.key()
    if key not in table.encoded:
        table.encoded.clear()
        table.encoded[key] = encode(table, enc)
    return table.encoded[key]
