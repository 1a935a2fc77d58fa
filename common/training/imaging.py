"""Imaging plans for 3-D volumes (dataset types `medical-folder` and `dicom`): `cnn3d`, a small
3-D CNN in plain torch, and `monai_classifier`, a MONAI network with MONAI transforms.

Both take `model_args`: `in_channels` (the number of selected modalities), `spatial_size`
([D, H, W]), `n_classes`, `n_covariates` (demographics columns the job selects, 0 by default)
and `width`. The node gives `x` as (N, C, D, H, W), or (N, C*D*H*W + K) when the job selects K
covariates (`split_input` takes it apart). Intensities are normalised per volume and channel
inside the model (zero mean, unit variance), so scanners with different intensity scales give
the same input, and `Experiment.model()` carries its own preprocessing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.training.plan import TrainingPlan


def split_input(x: torch.Tensor, in_channels: int, spatial_size: tuple[int, int, int],
                n_covariates: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The volumes (N, C, D, H, W) and covariates (N, K) of a batch."""
    if x.ndim == 5:
        return x, None
    voxels = in_channels * math.prod(spatial_size)
    vol = x[:, :voxels].reshape(len(x), in_channels, *spatial_size)
    return vol, (x[:, voxels:voxels + n_covariates] if n_covariates else None)


def normalize_volumes(vol: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per volume and channel: zero mean, unit variance (different scanners, one scale)."""
    flat = vol.flatten(2)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True, unbiased=False)
    return ((flat - mean) / (std + eps)).view_as(vol)


class CNN3D(nn.Module):
    """Two 3-D conv blocks, global max and mean pooling, covariates joined before the head."""

    def __init__(self, in_channels: int = 1, spatial_size: list[int] | tuple[int, ...] = (16, 16, 16),
                 n_classes: int = 2, n_covariates: int = 0, width: int = 8) -> None:
        super().__init__()
        self.in_channels, self.spatial_size, self.n_covariates = in_channels, tuple(spatial_size), n_covariates
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(4 * width + n_covariates, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vol, cov = split_input(x, self.in_channels, self.spatial_size, self.n_covariates)
        h = self.features(normalize_volumes(vol))
        pooled = [h.amax(dim=(2, 3, 4)), h.mean(dim=(2, 3, 4))]
        if cov is not None:
            pooled.append(cov)
        return self.head(torch.cat(pooled, dim=1))


class MonaiClassifier(nn.Module):
    """MONAI network blocks: a `monai.networks.blocks.Convolution` (3-D, PReLU), max pooling, a
    `monai.networks.blocks.ResidualUnit` (two subunits, affine instance norm), global max and
    mean pooling, covariates joined, a linear head. Each volume is normalised by MONAI's
    `NormalizeIntensity` (channel-wise) first."""

    def __init__(self, in_channels: int = 1, spatial_size: list[int] | tuple[int, ...] = (16, 16, 16),
                 n_classes: int = 2, n_covariates: int = 0, width: int = 8) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit
        from monai.transforms import NormalizeIntensity

        self.in_channels, self.spatial_size, self.n_covariates = in_channels, tuple(spatial_size), n_covariates
        self.normalize = NormalizeIntensity(channel_wise=True)
        self.encoder = nn.Sequential(
            Convolution(spatial_dims=3, in_channels=in_channels, out_channels=width, kernel_size=3, act="prelu",
                        norm=None),
            nn.MaxPool3d(2),
            ResidualUnit(spatial_dims=3, in_channels=width, out_channels=2 * width, subunits=2, act="prelu",
                         norm=("instance", {"affine": True})),
        )
        self.head = nn.Linear(4 * width + n_covariates, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vol, cov = split_input(x, self.in_channels, self.spatial_size, self.n_covariates)
        vol = torch.stack([torch.as_tensor(self.normalize(v)) for v in vol])
        h = self.encoder(vol)
        pooled = [h.amax(dim=(2, 3, 4)), h.mean(dim=(2, 3, 4))]
        if cov is not None:
            pooled.append(cov)
        return self.head(torch.cat(pooled, dim=1))


class _VolumePlan(TrainingPlan):
    """Cross-entropy over volumes; validation reports loss and accuracy."""

    input_kind = "volumes"

    def training_step(self, model, x, y):
        return F.cross_entropy(model(self.augment(x)), y.long())

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def validation_step(self, model, x, y):
        logits = model(x)
        return {"loss": float(F.cross_entropy(logits, y.long(), reduction="sum")),
                "accuracy": float((logits.argmax(1) == y.long()).sum())}


class CNN3DPlan(_VolumePlan):
    def build_model(self):
        return CNN3D(**self.model_args)


class MonaiClassifierPlan(_VolumePlan):
    """`MonaiClassifier`; with `training_args.augment` true, MONAI's random flips and Gaussian
    noise on each training volume (covariates untouched)."""

    def build_model(self):
        return MonaiClassifier(**self.model_args)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training_args.get("augment"):
            return x
        from monai.transforms import Compose, RandFlip, RandGaussianNoise

        args: dict[str, Any] = {"in_channels": 1, "spatial_size": (16, 16, 16), "n_covariates": 0, **self.model_args}
        vol, cov = split_input(x, int(args["in_channels"]), tuple(args["spatial_size"]), int(args["n_covariates"]))
        rand = Compose([RandFlip(prob=0.5, spatial_axis=0), RandGaussianNoise(prob=0.5, std=0.05)])
        rand.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))  # from the task's seeded RNG
        out = torch.stack([torch.as_tensor(rand(v)).float() for v in vol])
        return out if cov is None else torch.cat([out.flatten(1), cov], dim=1)


IMAGING_PLANS: dict[str, type[TrainingPlan]] = {
    "cnn3d": CNN3DPlan,
    "monai_classifier": MonaiClassifierPlan,
}
