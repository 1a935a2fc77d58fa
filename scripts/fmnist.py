"""Fashion-MNIST from Debian's dataset-fashion-mnist package, split into shards for nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from node.datasets import read_idx

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} missing: apt-get install -y dataset-fashion-mnist (make setup does it)")
    return read_idx(images), read_idx(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")


def write_shards(folder: Path, n: int, *, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Split the training set IID into `n` .npz shards (x uint8 images, y labels)."""
    x, y = load("train")
    order = np.random.default_rng(seed).permutation(len(x))[: limit or len(x)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(order, n)):
        path = folder / f"shard-{i:03d}.npz"
        np.savez(path, x=x[part], y=y[part].astype(np.int64))
        paths.append(path)
    return paths


def test_tensors(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test set as the nodes see images: (N, 1, 28, 28) floats in [0, 1], labels."""
    x, y = load("test")
    x, y = x[:limit], y[:limit]
    return torch.from_numpy(x[:, None].astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
