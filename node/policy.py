"""What a site lets leave it, set by its admin (node.toml), enforced by the node whatever a
researcher asks. Pure settings: no torch, nothing read from data here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class StatisticsPolicy(BaseModel):
    """What the site lets federated statistics reveal (node.toml `[statistics]`)."""

    extremes: Literal["off", "exact"] = Field(
        default="off", description="per-feature min/max: off (default), or exact (each is one patient's value)")
    max_bins: int = Field(default=64, ge=1, le=4096, description="most histogram bins a request may ask for")
    min_cell_count: int = Field(default=5, ge=1, description="histogram cells counting fewer patients are sent as 0")
    max_features: int = Field(default=100_000, ge=1, description="refuse statistics of wider data")
    max_pending: int = Field(default=4, ge=1, description="requests queued beyond the one being computed are refused")
