"""Update compression: exact where it should be, bounded where it is lossy, refusing bad input."""

from __future__ import annotations

import pytest
import torch

from common.compression import (
    CompressionError,
    CompressionSpec,
    compress,
    decode_update,
    decompress,
    encode_update,
    wire_bytes,
)


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
            "steps": torch.tensor(7, dtype=torch.int64)}


def test_float16_halves_the_bytes_and_keeps_the_change_to_half_precision():
    ref, new = _model(0), _model(1)
    spec = CompressionSpec(kind="float16")
    wire, residual = encode_update(new, ref, spec)
    assert residual == {}
    assert wire_bytes(wire) < 0.51 * wire_bytes(new) + 8
    rebuilt = decode_update(wire, ref, spec)
    assert torch.allclose(rebuilt["w"], new["w"], atol=2e-3)
    assert rebuilt["steps"].item() == 7 and rebuilt["steps"].dtype == torch.int64  # integer buffers travel whole


def test_int8_error_is_at_most_half_a_step_and_feedback_carries_the_rest():
    ref, new = _model(0), _model(1)
    spec = CompressionSpec(kind="int8")
    wire, residual = encode_update(new, ref, spec)
    delta = new["w"] - ref["w"]
    step = float(delta.abs().max()) / 127
    rebuilt = decode_update(wire, ref, spec)
    assert float((rebuilt["w"] - new["w"]).abs().max()) <= step / 2 + 1e-6
    assert torch.allclose(residual["w"], new["w"] - rebuilt["w"], atol=1e-6)
    assert wire_bytes(wire) < 0.27 * wire_bytes(new)


def test_topk_sends_the_largest_entries_and_error_feedback_delivers_the_rest_later():
    ref = {"w": torch.zeros(1000)}
    change = torch.linspace(-1, 1, 1000)
    spec = CompressionSpec(kind="topk", fraction=0.1)
    wire, residual = encode_update({"w": change}, ref, spec)
    assert wire["w::idx"].numel() == 100
    got = decode_update(wire, ref, spec)["w"]
    assert set(torch.nonzero(got).flatten().tolist()) == set(change.abs().topk(100).indices.tolist())
    # with the same change every round, everything arrives eventually (nothing lost for good)
    total = got.clone()
    for _ in range(30):
        wire, residual = encode_update({"w": change}, ref, spec, residual)
        total += decode_update(wire, ref, spec)["w"]
    assert torch.allclose(total + residual["w"], 31 * change, atol=1e-3)  # sent + still owed = all of it
    assert float((total / 31 - change).abs().mean()) < 0.15 * float(change.abs().mean())  # 0.069 vs 0.50
    assert wire_bytes(wire) < 0.16 * 4 * 1000  # (4 + 2 bytes) x 10% of the entries


@pytest.mark.parametrize("kind", ["float16", "int8", "topk"])
def test_a_forged_compressed_update_is_refused_with_a_reason(kind):
    ref = _model(0)
    spec = CompressionSpec(kind=kind, fraction=0.05)
    wire = compress({n: t - ref[n] if t.is_floating_point() else t for n, t in _model(1).items()}, spec)
    bad = dict(wire)
    bad.pop("b::val")
    with pytest.raises(CompressionError, match="do not match|b: no values"):
        decompress(bad, ref, spec)
    with pytest.raises(CompressionError):
        decompress({**wire, "extra::val": torch.zeros(3)}, ref, spec)
    if kind == "topk":
        with pytest.raises(CompressionError, match="out of range"):
            decompress({**wire, "b::idx": torch.tensor([0, 99999], dtype=torch.int32),
                        "b::val": torch.zeros(2, dtype=torch.float16)}, ref, spec)
    if kind == "int8":
        with pytest.raises(CompressionError, match="scale"):
            decompress({k: v for k, v in wire.items() if k != "w::scale"}, ref, spec)


def test_the_job_setting_is_validated():
    assert CompressionSpec.of({}).kind == "none"
    assert CompressionSpec.of({"compression": "int8"}).feedback
    assert not CompressionSpec.of({"compression": {"kind": "float16"}}).feedback
    with pytest.raises(ValueError):
        CompressionSpec.of({"compression": {"kind": "zip"}})
    with pytest.raises(ValueError):
        CompressionSpec.of({"compression": {"kind": "topk", "fraction": 0}})


@pytest.mark.parametrize("kind", ["float16", "int8", "topk"])
def test_the_node_compresses_numpy_held_tensors_as_it_did_torch_ones(kind):
    """Issue 21: the node (no torch) sends the same wire tensors as a torch implementation would."""
    from common import codec

    spec = CompressionSpec(kind=kind, fraction=0.1)
    ref, new = _model(0), _model(1)
    wire_t, res_t = encode_update(new, ref, spec)
    held = {n: codec.decode(codec.encode(t), torch_tensors=False) for n, t in new.items()}
    held_ref = {n: codec.decode(codec.encode(t), torch_tensors=False) for n, t in ref.items()}
    wire_n, res_n = encode_update(held, held_ref, spec)
    assert all(isinstance(t, codec.TorchArray) for t in wire_n.values())
    assert {k: codec.encode(v) for k, v in wire_n.items()} == {k: codec.encode(v) for k, v in wire_t.items()}
    assert set(res_n) == set(res_t)
