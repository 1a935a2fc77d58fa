"""Ready training plans, referenced by name in a job: mlp, cnn, logreg, vae, linear_vae, the
scikit-learn ones (sgd_classifier, sgd_regressor, perceptron) and the imaging ones (cnn3d,
monai_classifier)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.training.imaging import IMAGING_PLANS
from common.training.plan import TrainingPlan
from common.training.sklearn_plans import SKLEARN_PLANS


class MLP(nn.Module):
    """Fully connected classifier: in_features -> hidden... -> n_classes."""

    def __init__(self, in_features: int = 784, hidden: list[int] | int = 128, n_classes: int = 10) -> None:
        super().__init__()
        sizes = [in_features, *([hidden] if isinstance(hidden, int) else hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Two conv blocks and a linear head, for small single-channel images (28x28 by default)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, n_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * (image_size // 4) ** 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class VAE(nn.Module):
    """Variational autoencoder with three-layer encoder and decoder (Kingma & Welling, 2014)."""

    def __init__(self, in_features: int = 784, hidden: list[int] | None = None, latent: int = 2,
                 linear: bool = False) -> None:
        super().__init__()
        hidden = [512, 256] if hidden is None else list(hidden)  # [] is a linear encoder straight to the latent
        act: type[nn.Module] = nn.Identity if linear else nn.ReLU
        enc: list[nn.Module] = []
        sizes = [in_features, *hidden]
        for a, b in zip(sizes, sizes[1:], strict=False):
            enc += [nn.Linear(a, b), act()]
        self.encoder = nn.Sequential(*enc)
        self.mu = nn.Linear(sizes[-1], latent)
        self.logvar = nn.Linear(sizes[-1], latent)
        dec: list[nn.Module] = []
        back = [latent, *reversed(hidden)]
        for a, b in zip(back, back[1:], strict=False):
            dec += [nn.Linear(a, b), act()]
        dec.append(nn.Linear(back[-1], in_features))
        self.decoder = nn.Sequential(*dec)
        self.linear = linear

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.flatten(1))
        return self.mu(h), self.logvar(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(z), mu, logvar


def vae_loss(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO per sample: reconstruction (BCE for images in [0,1], MSE for a linear VAE) + KL."""
    recon, mu, logvar = model(x)
    target = x.flatten(1)
    if model.linear:
        rec = F.mse_loss(recon, target, reduction="sum")
    else:
        rec = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (rec + kl) / len(x)


class ClassifierPlan(TrainingPlan):
    """Cross-entropy training; validation reports loss and accuracy."""

    def training_step(self, model, x, y):
        return F.cross_entropy(model(x), y.long())

    def validation_step(self, model, x, y):
        logits = model(x)
        return {
            "loss": float(F.cross_entropy(logits, y.long(), reduction="sum")),
            "accuracy": float((logits.argmax(1) == y.long()).sum()),
        }


class MLPPlan(ClassifierPlan):
    def build_model(self):
        return MLP(**self.model_args)


class CNNPlan(ClassifierPlan):
    input_kind = "images"

    def build_model(self):
        return CNN(**self.model_args)


class LogRegPlan(ClassifierPlan):
    """Multinomial logistic regression (an MLP with no hidden layer)."""

    def build_model(self):
        args: dict[str, Any] = {"in_features": 784, "n_classes": 10, **self.model_args, "hidden": []}
        return MLP(**args)


class VAEPlan(TrainingPlan):
    task = "reconstruction"

    def build_model(self):
        return VAE(**self.model_args)

    def training_step(self, model, x, y):
        return vae_loss(model, x)


class LinearVAEPlan(VAEPlan):
    def build_model(self):
        return VAE(**{**self.model_args, "linear": True})


ZOO: dict[str, type[TrainingPlan]] = {
    "mlp": MLPPlan,
    "cnn": CNNPlan,
    "logreg": LogRegPlan,
    "vae": VAEPlan,
    "linear_vae": LinearVAEPlan,
    **SKLEARN_PLANS,  # sgd_classifier, sgd_regressor, perceptron (scikit-learn, imported when trained)
    **IMAGING_PLANS,  # cnn3d, monai_classifier (3-D volumes; MONAI imported when built)
}
