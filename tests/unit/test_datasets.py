"""Dataset loaders and the registry: good files load with metadata, bad ones are refused clearly."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from node import datasets
from node.datasets import DatasetError
from node.db import Database
from node.registry import Registry


def _idx(path, arr: np.ndarray, code: int = 0x08, gz: bool = True):
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(">u1" if code == 0x08 else ">f4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_csv_with_target(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("age,volume,label\n70,1.5,1\n65,2.0,0\n80,1.1,1\n")
    data = datasets.load("csv", path, target="label")
    assert data.x.shape == (3, 2) and data.y.tolist() == [1, 0, 1]
    assert data.meta["features"] == ["age", "volume"] and data.meta["n_classes"] == 2


@pytest.mark.parametrize(
    ("content", "target", "message"),
    [("", None, "empty"), ("a,b\n", None, "no rows"), ("a,b\n1,x\n", None, "line 2, column 2 is not a number"),
     ("a,b\n1,2\n", "c", "target column 'c' is not in the header")],
)
def test_bad_csv_is_refused(tmp_path, content, target, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        datasets.load("csv", path, target=target)


def test_npz_uint8_images_and_float_features(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.full((4, 5, 5), 255, np.uint8), y=np.arange(4))
    data = datasets.load("npz", tmp_path / "img.npz")
    assert data.x.shape == (4, 1, 5, 5) and float(data.x.max()) == 1.0 and data.meta["n_classes"] == 4
    np.save(tmp_path / "f.npy", np.ones((3, 7), np.float64))
    assert datasets.load("npy", tmp_path / "f.npy").x.shape == (3, 7)
    np.savez(tmp_path / "bad.npz", features_wrong=np.ones(3))
    with pytest.raises(DatasetError, match="needs an array named x"):
        datasets.load("npz", tmp_path / "bad.npz")
    np.savez(tmp_path / "mismatch.npz", x=np.ones((3, 2)), y=np.ones(2))
    with pytest.raises(DatasetError, match="3 samples but 2 labels"):
        datasets.load("npz", tmp_path / "mismatch.npz")


def test_idx_images_find_their_labels(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte.gz", np.arange(2 * 4 * 4).reshape(2, 4, 4) % 256)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 7]))
    data = datasets.load("idx", tmp_path / "train-images-idx3-ubyte.gz")
    assert data.x.shape == (2, 1, 4, 4) and data.y.tolist() == [3, 7]
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(DatasetError, match="not an IDX file"):
        datasets.load("idx", tmp_path / "junk.gz")


def test_image_folders(tmp_path):
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = datasets.load("images", tmp_path)
    assert data.x.shape == (4, 1, 6, 6) and data.y.tolist() == [0, 0, 1, 1]
    assert data.meta["classes"] == ["benign", "malignant"]
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "benign" / "odd.png")
    with pytest.raises(DatasetError, match="differ in size"):
        datasets.load("images", tmp_path)


def test_missing_paths_and_types(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load("csv", tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="unknown dataset type"):
        datasets.load("parquet", tmp_path)
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        datasets.load("images", tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None


def test_registry_round_trip_and_refusals(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3), np.float32), y=np.zeros(5))
    reg = Registry(Database(tmp_path / "node.db"))
    ds = reg.add("d1", "npz", tmp_path / "d.npz", ["a", "b"], description="test")
    assert reg.get("d1") == ds and ds.public().n_samples == 5 and ds.public().shape == [3]
    assert [d.name for d in reg.matching(["a"])] == ["d1"] and reg.matching(["a", "zzz"]) == []
    with pytest.raises(DatasetError, match="exists already"):
        reg.add("d1", "npz", tmp_path / "d.npz", ["a"])
    with pytest.raises(DatasetError, match="at least one"):
        reg.add("d2", "npz", tmp_path / "d.npz", [])
    with pytest.raises(DatasetError, match="invalid dataset name"):
        reg.add("../x", "npz", tmp_path / "d.npz", ["a"])
    assert reg.remove("d1") and reg.get("d1") is None and not reg.remove("d1")
    # the public view never carries the path
    assert "path" not in ds.public().model_dump()
