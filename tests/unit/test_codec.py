"""Codec round trips (hypothesis) and refusals of malformed tensor payloads."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import codec
from common.errors import BadMessage, Reason

NUMPY_DTYPES = ["bool", "u1", "i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16"]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                torch.uint16, torch.uint32, torch.uint64, torch.complex128]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(NUMPY_DTYPES).flatmap(lambda d: hnp.arrays(np.dtype(d), shapes)))
def test_numpy_round_trip(arr):
    out = codec.decode(codec.encode({"a": arr}))["a"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()  # bit-identical, NaNs included


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(TORCH_DTYPES), shapes, st.integers(0, 2**31))
def test_torch_round_trip(dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 100, shape, generator=gen) if dtype != torch.bool else torch.randint(0, 2, shape, generator=gen)
    tensor = base.to(dtype)
    out = codec.decode(codec.encode([tensor]))[0]
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.dtype("<f8"), hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=6)))
def test_non_contiguous_input(arr):
    view = arr[::-1, ::2]
    assert codec.decode(codec.encode(view)).tobytes() == np.ascontiguousarray(view).tobytes()
    tview = torch.from_numpy(arr).transpose(0, 1)
    assert codec.decode(codec.encode(tview)).numpy().tobytes() == tview.contiguous().numpy().tobytes()


@pytest.mark.parametrize("dtype", [">f4", ">i8", ">c16", ">u2"])
def test_big_endian_is_converted_to_little_endian(dtype):
    arr = np.arange(12, dtype=dtype).reshape(3, 4)
    out = codec.decode(codec.encode(arr))
    assert out.dtype == np.dtype(dtype).newbyteorder("<")
    assert np.array_equal(out, arr)


def test_nested_structures_and_scalars():
    obj = {"w": torch.ones(2, 3), "meta": {"n": 3, "x": 1.5, "s": "é", "b": b"\x00", "l": [None, True]},
           "np": np.float32(2.5)}
    out = codec.decode(codec.encode(obj))
    assert torch.equal(out["w"], obj["w"]) and out["meta"] == obj["meta"] and out["np"] == 2.5


def test_decoding_does_not_copy_the_tensor_bytes_again():
    out = codec.decode(codec.encode(np.arange(1000, dtype=np.float32).reshape(10, 100)))
    base = out
    while isinstance(base, np.ndarray):
        assert not base.flags.owndata
        base = base.base
    assert isinstance(base, bytes)  # a view on the bytes msgpack handed over
    assert out.flags.aligned
    tensor = codec.decode(codec.encode(torch.arange(1000, dtype=torch.float64).reshape(10, 10, 10)))
    assert tensor.data_ptr() % 16 == 0


def test_requires_grad_and_conjugate_views_are_sent_as_values():
    w = torch.randn(3, requires_grad=True)
    assert torch.equal(codec.decode(codec.encode(w)), w.detach())
    c = torch.randn(3, dtype=torch.complex64).conj()
    assert torch.equal(codec.decode(codec.encode(c)), c.resolve_conj())


def _ext(payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(codec.TENSOR_EXT, payload))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x0b", b"\x00\x0b\x01\x00", b"\x00\x0b\x01\x00" + (4).to_bytes(8, "little") + b"\x00" * 19,
     b"\x00\x63\x00\x00", b"\x07\x0b\x00\x00" + b"\x00" * 16],
    ids=["empty", "truncated-head", "truncated-shape", "wrong-size", "bad-dtype", "bad-kind"],
)
def test_malformed_tensors_are_refused(payload):
    with pytest.raises(BadMessage) as err:
        codec.decode(_ext(payload))
    assert err.value.reason == Reason.BAD_TENSOR


def test_unknown_ext_and_garbage_are_refused():
    with pytest.raises(BadMessage):
        codec.decode(msgpack.packb(msgpack.ExtType(42, b"x")))
    with pytest.raises(BadMessage) as err:
        codec.decode(b"\xc1\xc1")
    assert err.value.reason == Reason.NOT_MSGPACK


def test_unsupported_types_fail_at_encode():
    with pytest.raises(TypeError):
        codec.encode(object())
    with pytest.raises(TypeError):
        codec.encode(np.array(["a"], dtype=object))


def test_encode_parts_joins_to_exactly_encode_and_does_not_copy_big_tensors():
    import numpy as np

    from common.codec import encode, encode_parts

    big = torch.randn(100_000)
    cases = [
        {"w": big, "b": torch.zeros(3), "n": 7, "s": "x", "l": [1.5, None, b"raw"], "e": torch.zeros(0)},
        {"half": torch.randn(5, 4).half(), "bf": torch.randn(3).bfloat16(), "i": torch.arange(6).reshape(2, 3)},
        {"np": np.arange(10_000, dtype=">i4"), "f": np.float32(2.5), "nc": np.arange(20).reshape(4, 5).T},
        [torch.zeros(4), torch.zeros(2), torch.ones(1), torch.tensor(3.0)],  # fixext sizes
        {"t": torch.randn(300, 300)[:, ::2]},  # not contiguous
    ]
    for obj in cases:
        parts = encode_parts(obj)
        assert b"".join(parts) == encode(obj)
    parts = encode_parts(cases[0])
    views = [p for p in parts if isinstance(p, memoryview)]
    assert views and views[0].nbytes == big.numel() * 4
    assert np.shares_memory(np.frombuffer(views[0], dtype=np.float32), big.numpy())


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TORCH_DTYPES), shapes, st.integers(0, 2**31))
def test_a_node_holds_torch_tensors_as_numpy_and_forwards_them_byte_for_byte(dtype, shape, seed):
    """Issue 21: the node decodes without torch (TorchArray) and re-encodes the same bytes."""
    gen = torch.Generator().manual_seed(seed)
    tensor = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=gen).to(dtype)
    wire = codec.encode({"t": tensor})
    held = codec.decode(wire, torch_tensors=False)["t"]
    assert isinstance(held, codec.TorchArray) and held.shape == tensor.shape
    assert codec.dtype_name(held) == str(dtype).removeprefix("torch.")
    assert codec.encode({"t": held}) == wire
    if dtype.is_floating_point:
        assert np.array_equal(codec.as_float(held), tensor.float().numpy())


def test_containers_without_a_big_tensor_are_packed_whole_and_still_byte_for_byte(monkeypatch):
    """A round's history (10,000 reports a round) was walked item by item in Python: 0.8 s a
    round at the aggregator. Containers holding no big tensor go to msgpack's packer whole."""
    import numpy as np

    from common import codec

    reports = [{"node": f"sim-{i:05d}", "n_samples": 32, "metrics": {"train_loss": 0.25 + i}, "timings": {}}
               for i in range(1000)]
    at_edge = torch.zeros(1024)  # exactly 4,096 bytes: referenced
    below = torch.zeros(1023)  # copied
    cases = [
        {"rounds": [{"round": 1, "reports": reports, "notes": {"s": {1, 2}, "t": (1, "a")}}]},
        {"a": [{"b": {"c": [1, at_edge, below]}}], "d": reports[:3], "e": np.arange(3.0)},
        {"deep": [[[torch.randn(5000)]]], "f": frozenset({"x"}), "g": np.float64(1.5)},
    ]
    calls = []
    walk = codec._walk
    monkeypatch.setattr(codec, "_walk", lambda *a: (calls.append(1), walk(*a))[1])
    for obj in cases:
        calls.clear()
        parts = codec.encode_parts(obj)
        assert b"".join(parts) == codec.encode(obj)
        if obj is cases[0]:
            assert len(calls) == 1, f"{len(calls)} walk steps for a body without a big tensor"
    views = [p for p in codec.encode_parts(cases[1]) if isinstance(p, memoryview)]
    assert len(views) == 1 and np.shares_memory(np.frombuffer(views[0], dtype=np.float32), at_edge.numpy())
