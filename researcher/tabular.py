"""Aligning a table's encoding across sites, from what each node publishes about its columns.

Sites hold different subsets of a column's categories (one clinic sees no AD patients, another
records a rare genotype). A job that one-hot encodes must give every site the same category
lists, or the sites' features would not line up: the researcher takes the union of the
categories the nodes publish (rare ones are never published) and puts it in the job.

    infos = node_datasets(bundle, tags=["adni"])
    encoding = aligned_encoding(infos.values(), target="dx", one_hot=["sex", "apoe"], numeric=["age"])
    Experiment(bundle, plan="logreg", training_args={"encoding": encoding, ...}, ...)
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.identity import Identity
from common.messages import DatasetInfo
from common.messenger import Messenger
from common.settings import TransportSettings


class EncodingError(ValueError):
    """The nodes' metadata cannot give the encoding asked for; the message says why."""


def node_datasets(bundle: str | Path | Identity, *, tags: list[str], wait_s: float = 2.0,
                  mqtt: TransportSettings | None = None) -> dict[str, DatasetInfo]:
    """node -> its first dataset carrying every one of `tags`, from the nodes' retained status."""
    from researcher.experiment import researcher_settings

    identity = bundle if isinstance(bundle, Identity) else Identity.load(bundle)
    got: queue.Queue = queue.Queue()
    m = Messenger(identity, researcher_settings(mqtt), client_id=uuid.uuid4().hex[:8])
    m.subscribe("fbm/v1/nodes/+/status", got.put, types={"node_status"})
    m.connect()
    found: dict[str, DatasetInfo] = {}
    try:
        while True:
            msg = got.get(timeout=wait_s)
            match = [d for d in msg.body.datasets if set(tags) <= set(d.tags)]
            if match and msg.body.state == "online":
                found[msg.sender] = match[0]
    except queue.Empty:
        pass
    finally:
        m.close()
    return found


def category_union(infos: Iterable[DatasetInfo], column: str) -> list[str]:
    """The sorted union of a categorical column's published categories over the sites."""
    cats: set[str] = set()
    for info in infos:
        entry = info.columns.get(column)
        if entry is None:
            raise EncodingError(f"dataset {info.name!r} publishes no column {column!r}")
        if entry["kind"] != "categorical":
            raise EncodingError(f"column {column!r} of dataset {info.name!r} is {entry['kind']}, not categorical")
        cats.update(entry.get("categories", []))
    return sorted(cats)


def aligned_encoding(infos: Iterable[DatasetInfo], *, target: str | None = None, one_hot: list[str] = (),
                     ordinal: dict[str, list[str]] | None = None, numeric: list[str] | None = None,
                     impute: str = "mean", scale: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """`training_args.encoding` with category lists (and the target's classes) shared by all sites."""
    infos = list(infos)
    if not infos:
        raise EncodingError("no node publishes a matching dataset")
    if numeric is None:
        common = [set(h for h, e in i.columns.items() if e["kind"] == "numeric" and h != target) for i in infos]
        numeric = sorted(set.intersection(*common))
    encoding: dict[str, Any] = {"numeric": list(numeric), "one_hot": {c: category_union(infos, c) for c in one_hot},
                                "ordinal": dict(ordinal or {}), "impute": impute, "scale": dict(scale or {})}
    if target is not None and any(i.columns.get(target, {}).get("kind") == "categorical" for i in infos):
        encoding["classes"] = category_union(infos, target)
    return encoding
