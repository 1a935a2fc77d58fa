"""Loaders for the field's data beyond plain arrays: clinical tables, medical images.

`prepare` is the one hook the training process calls: it turns what a loader read into what
the job asked for (a table encoded as `training_args.encoding` says, the
modalities and demographics columns an imaging job selects); other data passes as is.
"""

from __future__ import annotations

from typing import Any

from node.datasets import LoadedData


def prepare(data: LoadedData, training_args: dict[str, Any]) -> LoadedData:
    """The dataset as this job sees it."""
    from node.loaders.medical import ImagingData
    from node.loaders.medical import prepare as prepare_imaging
    from node.loaders.tabular import TableData
    from node.loaders.tabular import prepare as prepare_table

    if isinstance(data, TableData):
        return prepare_table(data, training_args)
    if isinstance(data, ImagingData):
        return prepare_imaging(data, training_args)
    return data
