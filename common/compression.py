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
from typing import Literal

import torch
from pydantic import BaseModel, Field

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


def compress(delta: dict[str, torch.Tensor], spec: CompressionSpec) -> dict[str, torch.Tensor]:
    """The wire tensors for a model change (floating tensors compressed, others whole)."""
    out: dict[str, torch.Tensor] = {}
    for name, d in delta.items():
        if not d.is_floating_point() or spec.kind == "none":
            out[_key(name, RAW)] = d
        elif spec.kind == "float16":
            out[_key(name, VALUE)] = d.to(torch.float16)
        elif spec.kind == "int8":
            scale = float(d.abs().max()) / 127.0 if d.numel() else 0.0
            q = torch.zeros_like(d, dtype=torch.int8) if scale == 0 else (d / scale).round_().clamp_(-127, 127).to(torch.int8)
            out[_key(name, VALUE)] = q
            out[_key(name, SCALE)] = torch.tensor([scale], dtype=torch.float32)
        else:
            flat = d.reshape(-1)
            k = max(1, math.ceil(spec.fraction * flat.numel())) if flat.numel() else 0
            idx = flat.abs().topk(k, sorted=False).indices if k else torch.zeros(0, dtype=torch.int64)
            out[_key(name, INDEX)] = idx.to(torch.int32)
            out[_key(name, VALUE)] = flat[idx].to(torch.float16)
    return out


def decompress(wire: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
               spec: CompressionSpec) -> dict[str, torch.Tensor]:
    """The change rebuilt at `reference`'s names, shapes and dtypes; CompressionError if it cannot be."""
    names = {k.split(_SEP, 1)[0] for k in wire}
    if _SEP not in "".join(wire) or names != set(reference):
        raise CompressionError(f"compressed update names {sorted(names)[:5]} do not match the model's")
    out: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        raw = wire.get(_key(name, RAW))
        if raw is not None:
            if raw.shape != ref.shape:
                raise CompressionError(f"{name}: shape {list(raw.shape)}, expected {list(ref.shape)}")
            out[name] = raw
            continue
        value = wire.get(_key(name, VALUE))
        if value is None:
            raise CompressionError(f"{name}: no values")
        if spec.kind == "float16" or (spec.kind == "none"):
            if value.shape != ref.shape:
                raise CompressionError(f"{name}: shape {list(value.shape)}, expected {list(ref.shape)}")
            out[name] = value.to(ref.dtype)
        elif spec.kind == "int8":
            scale = wire.get(_key(name, SCALE))
            if scale is None or scale.numel() != 1 or value.dtype != torch.int8 or value.shape != ref.shape:
                raise CompressionError(f"{name}: int8 values of shape {list(value.shape)} with scale {scale}")
            out[name] = value.to(ref.dtype) * scale.to(ref.dtype)
        else:
            idx = wire.get(_key(name, INDEX))
            if idx is None or idx.ndim != 1 or value.shape != idx.shape:
                raise CompressionError(f"{name}: top-k indices and values disagree")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= ref.numel()):
                raise CompressionError(f"{name}: top-k index out of range")
            dense = torch.zeros(ref.numel(), dtype=ref.dtype)
            dense[idx.long()] = value.to(ref.dtype)
            out[name] = dense.reshape(ref.shape)
    return out


def encode_update(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], spec: CompressionSpec,
                  residual: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Node side: (wire tensors, the new residual) for trained `params` against the received model."""
    delta = {n: (p - reference[n]) if p.is_floating_point() else p for n, p in params.items()}
    if spec.feedback and residual:
        delta = {n: d + residual[n] if n in residual else d for n, d in delta.items()}
    wire = compress(delta, spec)
    if not spec.feedback:
        return wire, {}
    sent = decompress(wire, delta, spec)
    return wire, {n: delta[n] - sent[n] for n in delta if delta[n].is_floating_point()}


def decode_update(wire: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                  spec: CompressionSpec) -> dict[str, torch.Tensor]:
    """Aggregator side: full parameters (reference + change)."""
    delta = decompress(wire, reference, spec)
    return {n: reference[n] + d if reference[n].is_floating_point() else d for n, d in delta.items()}


def wire_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
