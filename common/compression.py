"""Update compression: what a node sends is its model's change, made smaller; pure functions.

A job opts in with `training_args.compression = {kind, fraction, error_feedback}`:

- `float16`: the change in half precision (2x smaller than float32);
- `int8`: the change quantised per tensor to 8 bits with one float scale (~4x);
- `topk`: only the `fraction` largest-magnitude entries of each tensor, as int32 index + float16
  value pairs (e.g. fraction 0.01: ~33x).

With `error_feedback` (default on for int8 and topk) the node adds what compression dropped in
the previous round to the next change before compressing (Seide et al. 2014; Stich et al.
2018, "Sparsified SGD with memory"), so nothing is lost for good, only delayed.

Tensors that are not floating point (counters, integer buffers) travel whole and uncompressed.
The aggregator rebuilds full parameters as `global + change` and checks them as usual.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from common.codec import as_float, from_float, is_floating, like, nbytes

RAW, SCALE, INDEX, VALUE = "raw", "scale", "idx", "val"
_SEP = "::"


class CompressionError(ValueError):
    """A compressed update that cannot be rebuilt; the message says why."""


class CompressionSpec(BaseModel):
    kind: Literal["none", "float16", "int8", "topk"] = "none"
    fraction: float = Field(default=0.01, gt=0, le=1, description="topk: share of each tensor's entries sent")
    error_feedback: bool | None = Field(default=None, description="carry the dropped part to the next round (default: on for int8 and topk)")

    @property
    def feedback(self) -> bool:
        return self.kind in ("int8", "topk") if self.error_feedback is None else self.error_feedback and self.kind != "none"

    @classmethod
    def of(cls, training_args: dict) -> CompressionSpec:
        raw = training_args.get("compression") or {"kind": "none"}
        return cls.model_validate({"kind": raw} if isinstance(raw, str) else raw)


def _key(name: str, part: str) -> str:
    return f"{name}{_SEP}{part}"


def _compress_one(name: str, d: np.ndarray, spec: CompressionSpec) -> dict[str, np.ndarray]:
    if spec.kind == "float16":
        return {_key(name, VALUE): d.astype(np.float16)}
    if spec.kind == "int8":
        scale = float(np.abs(d).max()) / 127.0 if d.size else 0.0
        q = np.zeros(d.shape, np.int8) if scale == 0 else np.clip(np.rint(d / d.dtype.type(scale)), -127, 127).astype(np.int8)
        return {_key(name, VALUE): q, _key(name, SCALE): np.array([scale], dtype=np.float32)}
    flat = d.reshape(-1)
    k = max(1, math.ceil(spec.fraction * flat.size)) if flat.size else 0
    idx = np.argpartition(-np.abs(flat), k - 1)[:k] if k else np.zeros(0, np.int64)
    return {_key(name, INDEX): idx.astype(np.int32), _key(name, VALUE): flat[idx].astype(np.float16)}


def compress(delta: dict[str, Any], spec: CompressionSpec) -> dict[str, Any]:
    """The wire tensors for a model change (floating tensors compressed, others whole); torch
    tensors or numpy-held ones (`common.codec.TorchArray`), like the change's."""
    out: dict[str, Any] = {}
    for name, d in delta.items():
        if not is_floating(d) or spec.kind == "none":
            out[_key(name, RAW)] = d
            continue
        for key, arr in _compress_one(name, as_float(d), spec).items():
            out[key] = like(arr, d)
    return out


def _decompress_one(name: str, wire: dict[str, Any], ref: Any, spec: CompressionSpec) -> np.ndarray:
    """One floating tensor's change as numpy values of `ref`'s shape and (float) dtype."""
    shape, target = tuple(ref.shape), as_float(ref).dtype
    value = wire.get(_key(name, VALUE))
    if value is None:
        raise CompressionError(f"{name}: no values")
    value = as_float(value)
    if spec.kind in ("float16", "none"):
        if value.shape != shape:
            raise CompressionError(f"{name}: shape {list(value.shape)}, expected {list(shape)}")
        return value.astype(target)
    if spec.kind == "int8":
        scale = wire.get(_key(name, SCALE))
        scale = None if scale is None else as_float(scale)
        if scale is None or scale.size != 1 or value.dtype != np.int8 or value.shape != shape:
            raise CompressionError(f"{name}: int8 values of shape {list(value.shape)} with scale {scale}")
        return value.astype(target) * scale.astype(target).reshape(())
    idx = wire.get(_key(name, INDEX))
    idx = None if idx is None else as_float(idx)
    if idx is None or idx.ndim != 1 or value.shape != idx.shape or idx.dtype.kind not in "iu":
        raise CompressionError(f"{name}: top-k indices and values disagree")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= math.prod(shape)):
        raise CompressionError(f"{name}: top-k index out of range")
    dense = np.zeros(math.prod(shape), dtype=target)
    dense[idx.astype(np.int64)] = value.astype(target)
    return dense.reshape(shape)


def decompress(wire: dict[str, Any], reference: dict[str, Any], spec: CompressionSpec) -> dict[str, Any]:
    """The change rebuilt at `reference`'s names, shapes and dtypes (and tensor kind: torch or
    numpy-held); CompressionError if it cannot be."""
    names = {k.split(_SEP, 1)[0] for k in wire}
    if _SEP not in "".join(wire) or names != set(reference):
        raise CompressionError(f"compressed update names {sorted(names)[:5]} do not match the model's")
    out: dict[str, Any] = {}
    for name, ref in reference.items():
        raw = wire.get(_key(name, RAW))
        if raw is None:
            out[name] = from_float(_decompress_one(name, wire, ref, spec), ref)
        elif tuple(raw.shape) != tuple(ref.shape):
            raise CompressionError(f"{name}: shape {list(raw.shape)}, expected {list(ref.shape)}")
        else:
            out[name] = raw
    return out


def encode_update(params: dict[str, Any], reference: dict[str, Any], spec: CompressionSpec,
                  residual: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Node side: (wire tensors, the new residual) for trained `params` against the received
    model; numpy (no torch needed) for torch tensors or numpy-held ones alike."""
    delta = {n: from_float(as_float(p) - as_float(reference[n]), p) if is_floating(p) else p for n, p in params.items()}
    if spec.feedback and residual:
        delta = {n: from_float(as_float(d) + as_float(residual[n]), d) if n in residual else d for n, d in delta.items()}
    wire = compress(delta, spec)
    if not spec.feedback:
        return wire, {}
    sent = decompress(wire, delta, spec)
    return wire, {n: from_float(as_float(delta[n]) - as_float(sent[n]), delta[n]) for n in delta if is_floating(delta[n])}


def decode_update(wire: dict[str, Any], reference: dict[str, Any], spec: CompressionSpec) -> dict[str, Any]:
    """Aggregator side: full parameters (reference + change)."""
    delta = decompress(wire, reference, spec)
    return {n: from_float(as_float(reference[n]) + as_float(d), reference[n]) if is_floating(reference[n]) else d
            for n, d in delta.items()}


def wire_bytes(tensors: dict[str, Any]) -> int:
    return sum(nbytes(t) for t in tensors.values())
