"""The dataset registry: what a site has registered, with metadata computed at registration.

The registry stores the local path but never a copy of the data; only the public part
(`DatasetInfo`: name, tags, type, shape, sample count) ever leaves the node.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.messages import DatasetInfo
from node import datasets
from node.db import Database
from node.loaders.tabular import public_columns


@dataclass(frozen=True)
class Dataset:
    name: str
    type: str
    path: str
    tags: list[str]
    description: str
    target: str | None
    labels: str | None
    meta: dict[str, Any]
    added_at: float

    def public(self) -> DatasetInfo:
        return DatasetInfo(
            name=self.name,
            tags=self.tags,
            type=self.type,
            description=self.description,
            n_samples=int(self.meta.get("n_samples", 0)),
            shape=list(self.meta.get("shape", [])),
            features=list(self.meta.get("features") or []),
            target=self.target,
            n_classes=self.meta.get("n_classes"),
            columns=public_columns(self.meta.get("columns") or {}),
            imaging=self.meta.get("imaging") or {},
        )

    def load(self) -> datasets.LoadedData:
        return datasets.load(self.type, self.path, target=self.target, labels=self.labels)


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, name: str, kind: str, path: str | Path, tags: list[str], *, description: str = "",
            target: str | None = None, labels: str | Path | None = None) -> Dataset:
        """Read the data once (refusing what cannot be used), then record it."""
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise datasets.DatasetError(f"invalid dataset name {name!r}: use letters, digits, . _ -")
        if not tags or any(not t.strip() for t in tags):
            raise datasets.DatasetError("a dataset needs at least one non-empty tag")
        if self.get(name) is not None:
            raise datasets.DatasetError(f"a dataset named {name!r} exists already (remove it first)")
        path = Path(path).expanduser().resolve()
        loaded = datasets.load(kind, path, target=target, labels=labels)
        dataset = Dataset(
            name=name,
            type=kind,
            path=str(path),
            tags=sorted({t.strip() for t in tags}),
            description=description,
            target=target,
            labels=str(Path(labels).expanduser().resolve()) if labels else None,
            meta={k: v for k, v in loaded.meta.items() if v is not None},
            added_at=time.time(),
        )
        self.db.execute(
            "INSERT INTO datasets (name, type, path, tags, description, target, labels, meta, added_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dataset.name, dataset.type, dataset.path, json.dumps(dataset.tags), description, target,
             dataset.labels, json.dumps(dataset.meta), dataset.added_at),
        )
        return dataset

    def get(self, name: str) -> Dataset | None:
        rows = self.db.execute("SELECT * FROM datasets WHERE name = ?", (name,))
        return _row(rows[0]) if rows else None

    def list(self) -> list[Dataset]:
        return [_row(r) for r in self.db.execute("SELECT * FROM datasets ORDER BY name")]

    def remove(self, name: str) -> bool:
        existed = self.get(name) is not None
        self.db.execute("DELETE FROM datasets WHERE name = ?", (name,))
        return existed

    def matching(self, tags: list[str]) -> list[Dataset]:
        """Datasets carrying every one of `tags`."""
        wanted = set(tags)
        return [d for d in self.list() if wanted <= set(d.tags)]


def _row(row: dict) -> Dataset:
    return Dataset(
        name=row["name"], type=row["type"], path=row["path"], tags=json.loads(row["tags"]),
        description=row["description"], target=row["target"], labels=row["labels"],
        meta=json.loads(row["meta"]), added_at=row["added_at"],
    )
