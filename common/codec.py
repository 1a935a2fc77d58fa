"""msgpack with tensors: numpy arrays and torch tensors travel as one ext type.

torch is imported only when a torch tensor is decoded as one (`decode(..., torch_tensors=True)`,
the default) or was handed to the encoder (then it is imported already). The node process
decodes with `torch_tensors=False`: a tensor sent as torch comes out as a `TorchArray` (a numpy
array that remembers it was a torch tensor and is encoded back as one, bfloat16 included, held
as its uint16 bits), so the node never imports torch and what it forwards is byte for byte what
it got.

Ext payload (code 1): kind u8 (0 numpy, 1 torch), dtype u8, ndim u8, reserved u8, ndim x u64
dims, zero padding to a multiple of 16 bytes, then the raw little-endian bytes, C order. The
padding keeps the data 16-byte aligned in the received buffer (unaligned tensors are slow). Decoding takes the raw bytes msgpack hands us (its one copy)
and wraps them with `numpy.frombuffer` (and `torch.from_numpy`): no further copy. Decoded tensors
share memory with the received message, so treat them as read-only (`.clone()` to modify).
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from typing import Any

import msgpack
import numpy as np

from common.errors import BadMessage, Reason

TENSOR_EXT = 1
_KIND_NUMPY = 0
_KIND_TORCH = 1
_HEAD = struct.Struct("<BBBx")
_ALIGN = 16
_DIM = struct.Struct("<Q")

# dtype code -> (numpy dtype used for the bytes, torch dtype name)
_CODES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype("bool"), "bool"),
    2: (np.dtype("<u1"), "uint8"),
    3: (np.dtype("<i1"), "int8"),
    4: (np.dtype("<i2"), "int16"),
    5: (np.dtype("<u2"), "uint16"),
    6: (np.dtype("<i4"), "int32"),
    7: (np.dtype("<u4"), "uint32"),
    8: (np.dtype("<i8"), "int64"),
    9: (np.dtype("<u8"), "uint64"),
    10: (np.dtype("<f2"), "float16"),
    11: (np.dtype("<f4"), "float32"),
    12: (np.dtype("<f8"), "float64"),
    13: (np.dtype("<c8"), "complex64"),
    14: (np.dtype("<c16"), "complex128"),
    15: (np.dtype("<u2"), "bfloat16"),  # bytes carried as uint16, viewed as bfloat16
}
BFLOAT16 = 15
_NUMPY_TO_CODE = {np_dtype: code for code, (np_dtype, _) in _CODES.items() if code != BFLOAT16}
_TORCH_NAME_TO_CODE = {name: code for code, (_, name) in _CODES.items()}


class TorchArray(np.ndarray):
    """A tensor that arrived as a torch tensor, held as numpy (no torch import): encoded back as
    a torch tensor. `bfloat16` marks uint16 bits that are bfloat16 values (see `as_float`)."""

    bfloat16: bool = False

    def __array_finalize__(self, obj: Any) -> None:
        self.bfloat16 = bool(getattr(obj, "bfloat16", False)) and self.dtype == np.uint16


def torch_kind(arr: np.ndarray, bfloat16: bool = False) -> TorchArray:
    """`arr` (no copy) as a TorchArray: sent as a torch tensor."""
    held = np.asarray(arr).view(TorchArray)
    held.bfloat16 = bfloat16 and held.dtype == np.uint16
    return held


def is_torch(obj: Any) -> bool:
    """A torch tensor (False without importing torch when torch was never imported)."""
    torch_mod = sys.modules.get("torch")
    return torch_mod is not None and isinstance(obj, torch_mod.Tensor)


def tensor_code(obj: Any) -> int:
    """The wire dtype code of a numpy array, TorchArray or torch tensor (TypeError otherwise)."""
    if isinstance(obj, np.ndarray):
        if getattr(obj, "bfloat16", False):
            return BFLOAT16
        return _numpy_code(obj.dtype)
    if is_torch(obj):
        code = _TORCH_NAME_TO_CODE.get(str(obj.dtype).removeprefix("torch."))
        if code is None:
            raise TypeError(f"torch dtype {obj.dtype} cannot be sent")
        return code
    raise TypeError(f"{type(obj).__name__} is not a tensor")


def dtype_name(obj: Any) -> str:
    """The tensor's dtype as torch names it (float32, bfloat16, ...)."""
    return _CODES[tensor_code(obj)][1]


def as_float(obj: Any) -> np.ndarray:
    """A floating tensor's values as a plain numpy array (float32 for bfloat16; a view when it
    can be); any other tensor as a plain numpy array."""
    if is_torch(obj):
        obj = obj.detach().cpu()
        if str(obj.dtype) == "torch.bfloat16":
            obj = obj.float()
        return obj.resolve_conj().resolve_neg().numpy()
    arr = np.asarray(obj)
    if getattr(obj, "bfloat16", False):
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.view(np.ndarray)


def is_floating(obj: Any) -> bool:
    """Floating point (or complex, as torch counts them for a model's parameters)."""
    return tensor_code(obj) in (10, 11, 12, 13, 14, BFLOAT16)


def nbytes(obj: Any) -> int:
    """The tensor's data size in bytes (what it costs on the wire, headers aside)."""
    return math.prod(obj.shape) * _CODES[tensor_code(obj)][0].itemsize


def like(arr: np.ndarray, ref: Any) -> Any:
    """`arr` as the same kind of tensor as `ref`: torch, numpy-held torch (TorchArray) or numpy."""
    if is_torch(ref):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: the caller's array
            return sys.modules["torch"].from_numpy(np.ascontiguousarray(arr))
    return torch_kind(arr) if isinstance(ref, TorchArray) else np.asarray(arr).view(np.ndarray)


def same_kind(tensor: Any, ref: Any) -> Any:
    """`tensor` (no copy) as the kind of tensor `ref` is: torch, numpy-held torch or numpy."""
    if is_torch(ref) and not is_torch(tensor):
        out = like(np.asarray(tensor).view(np.ndarray), ref)
        return out.view(sys.modules["torch"].bfloat16) if getattr(tensor, "bfloat16", False) else out
    if isinstance(ref, TorchArray) and not isinstance(tensor, TorchArray) and not is_torch(tensor):
        return torch_kind(tensor)
    return tensor


def from_float(values: np.ndarray, ref: Any) -> Any:
    """Floating `values` (numpy) in `ref`'s dtype and tensor kind: bfloat16 rounded to nearest even."""
    code = tensor_code(ref)
    if code != BFLOAT16:
        return like(values.astype(_CODES[code][0], copy=False), ref)
    if is_torch(ref):
        return like(np.asarray(values, np.float32), ref).to(ref.dtype)
    bits = np.asarray(values, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return torch_kind(rounded, bfloat16=True)


def _torch() -> Any:
    import torch  # noqa: PLC0415 - only where a torch tensor is really wanted

    return torch


def _numpy_code(dtype: np.dtype) -> int:
    code = _NUMPY_TO_CODE.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if code is None:
        raise TypeError(f"numpy dtype {dtype} cannot be sent (supported: bool, ints, floats, complex)")
    return code


def _data_offset(ndim: int) -> int:
    size = _HEAD.size + ndim * _DIM.size
    return -(-size // _ALIGN) * _ALIGN


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) or is_torch(obj):
        head, raw = _raw_tensor(obj)
        return msgpack.ExtType(TENSOR_EXT, b"".join((head, raw)))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_tensor(data: bytes, torch_tensors: bool) -> Any:
    if len(data) < _HEAD.size:
        raise BadMessage(Reason.BAD_TENSOR, "tensor header truncated")
    kind, code, ndim = _HEAD.unpack_from(data)
    if code not in _CODES or kind not in (_KIND_NUMPY, _KIND_TORCH):
        raise BadMessage(Reason.BAD_TENSOR, f"unknown tensor kind {kind} or dtype code {code}")
    offset = _data_offset(ndim)
    if len(data) < offset:
        raise BadMessage(Reason.BAD_TENSOR, "tensor shape truncated")
    shape = tuple(_DIM.unpack_from(data, _HEAD.size + i * _DIM.size)[0] for i in range(ndim))
    np_dtype, name = _CODES[code]
    count = 1
    for dim in shape:
        count *= dim
    if count * np_dtype.itemsize != len(data) - offset:
        raise BadMessage(
            Reason.BAD_TENSOR,
            f"tensor of shape {shape} and dtype torch.{name} needs {count * np_dtype.itemsize} bytes, "
            f"got {len(data) - offset}",
        )
    arr = np.frombuffer(data, dtype=np_dtype, offset=offset).reshape(shape)
    if len(data) - offset <= 1:
        arr = arr.copy()  # CPython shares 0- and 1-byte bytes objects: never alias them.
    if kind == _KIND_NUMPY:
        return arr
    if not torch_tensors:
        return torch_kind(arr, code == BFLOAT16)
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: documented above
        tensor = torch.from_numpy(arr)
    return tensor.view(torch.bfloat16) if code == BFLOAT16 else tensor


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TENSOR_EXT:
        return _decode_tensor(data, True)
    raise BadMessage(Reason.BAD_TENSOR, f"unknown msgpack ext type {code}")


def _ext_hook_numpy(code: int, data: bytes) -> Any:
    if code == TENSOR_EXT:
        return _decode_tensor(data, False)
    raise BadMessage(Reason.BAD_TENSOR, f"unknown msgpack ext type {code}")


def _ext_head(n: int) -> bytes:
    """msgpack's ext header for an `n`-byte payload of our type (what Packer writes)."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes((fixed[n], TENSOR_EXT))
    if n <= 0xFF:
        return bytes((0xC7, n, TENSOR_EXT))
    if n <= 0xFFFF:
        return b"\xc8" + n.to_bytes(2, "big") + bytes((TENSOR_EXT,))
    return b"\xc9" + n.to_bytes(4, "big") + bytes((TENSOR_EXT,))


class _BigTensor(Exception):
    """A tensor to reference, not copy, met while packing a whole subtree (see `_walk`)."""


def _default_small(obj: Any) -> Any:
    """`_default`, refusing the tensors `_walk` sends by reference (BIG_TENSOR bytes or more)."""
    if isinstance(obj, np.ndarray) and obj.nbytes >= BIG_TENSOR:
        raise _BigTensor
    if is_torch(obj) and obj.numel() * obj.element_size() >= BIG_TENSOR:
        raise _BigTensor
    return _default(obj)


BIG_TENSOR = 4096  # bytes: a tensor this big is a part of its own (referenced), a smaller one is copied


def encode_parts(obj: Any) -> list[bytes | memoryview]:
    """`encode(obj)` as a list of pieces whose join is byte-for-byte `encode(obj)`; tensor data
    is referenced, not copied (the sender copies each byte once, into its chunk frames)."""
    packer = msgpack.Packer(default=_default, use_bin_type=True, datetime=False)
    whole = msgpack.Packer(default=_default_small, use_bin_type=True, datetime=False)
    parts: list[bytes | memoryview] = []
    small = bytearray()
    _walk(obj, packer, whole, parts, small)  # a module function: a recursive closure would be a
    if small:                                # reference cycle holding the tensors until the next gc
        parts.append(bytes(small))
    return parts


def _walk(o: Any, packer: msgpack.Packer, whole: msgpack.Packer, parts: list[bytes | memoryview],
          small: bytearray) -> None:
    """Append `o`'s msgpack to `small`, cutting `parts` around big tensors. A container is packed
    whole by msgpack's C packer unless it holds a big tensor (then walked here, item by item):
    walking every report of a 10,000-node round's history in Python took 0.8 s a round."""
    if isinstance(o, (dict, list, tuple, set, frozenset)):
        try:
            small.extend(whole.pack(o))
            return
        except _BigTensor:
            pass
    if isinstance(o, dict):
        small.extend(packer.pack_map_header(len(o)))
        for k, v in o.items():
            _walk(k, packer, whole, parts, small)
            _walk(v, packer, whole, parts, small)
    elif isinstance(o, (list, tuple, set, frozenset)):
        small.extend(packer.pack_array_header(len(o)))
        for v in o:
            _walk(v, packer, whole, parts, small)
    elif isinstance(o, np.ndarray) or is_torch(o):
        head, raw = _raw_tensor(o)
        small.extend(_ext_head(len(head) + len(raw)) + head)
        if len(raw) < BIG_TENSOR:
            small.extend(raw)
        else:
            parts.append(bytes(small))
            small.clear()
            parts.append(raw)
    else:
        small.extend(packer.pack(o))


def _raw_tensor(obj: Any) -> tuple[bytes, memoryview]:
    """(our tensor header with its padding, the raw C-order little-endian bytes) -- no data copy."""
    code = tensor_code(obj)
    if isinstance(obj, np.ndarray):
        kind = _KIND_TORCH if isinstance(obj, TorchArray) else _KIND_NUMPY
        if obj.dtype.byteorder == ">":
            obj = obj.astype(obj.dtype.newbyteorder("<"))
        if not obj.flags.c_contiguous:
            obj = obj.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        shape, arr = obj.shape, obj
    else:
        torch = sys.modules["torch"]
        tensor = obj.cpu() if obj.device.type != "cpu" else obj
        tensor = tensor.detach().contiguous()
        shape = tuple(tensor.shape)
        if code == BFLOAT16:
            tensor = tensor.view(torch.int16)
        kind, arr = _KIND_TORCH, tensor.resolve_conj().resolve_neg().numpy()
    if len(shape) > 255:
        raise TypeError("tensors with more than 255 dimensions cannot be sent")
    head = _HEAD.pack(kind, code, len(shape)) + b"".join(_DIM.pack(d) for d in shape)
    head += b"\x00" * (_data_offset(len(shape)) - len(head))
    return head, memoryview(arr.reshape(-1)).cast("B")


def encode(obj: Any) -> bytes:
    """msgpack bytes for `obj` (dicts, lists, scalars, str, bytes, numpy arrays, torch tensors)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True, datetime=False)


def decode(data: bytes | bytearray | memoryview, torch_tensors: bool = True) -> Any:
    """The object `encode` produced; BadMessage if the bytes are not our msgpack. With
    `torch_tensors` false a torch tensor comes out as a `TorchArray` and torch is not imported."""
    try:
        return msgpack.unpackb(
            data, ext_hook=_ext_hook if torch_tensors else _ext_hook_numpy, raw=False, strict_map_key=False,
            use_list=True,
        )
    except BadMessage:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise BadMessage(Reason.NOT_MSGPACK, f"undecodable msgpack: {type(exc).__name__} {exc}") from exc
