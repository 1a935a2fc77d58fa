"""msgpack with tensors: numpy arrays and torch tensors travel as one ext type.

Ext payload (code 1): kind u8 (0 numpy, 1 torch), dtype u8, ndim u8, reserved u8, ndim x u64
dims, zero padding to a multiple of 16 bytes, then the raw little-endian bytes, C order. The
padding keeps the data 16-byte aligned in the received buffer (unaligned tensors are slow). Decoding takes the raw bytes msgpack hands us (its one copy)
and wraps them with `numpy.frombuffer` and `torch.from_numpy`: no further copy. Decoded tensors
share memory with the received message, so treat them as read-only (`.clone()` to modify).
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

import msgpack
import numpy as np
import torch

from common.errors import BadMessage, Reason

TENSOR_EXT = 1
_KIND_NUMPY = 0
_KIND_TORCH = 1
_HEAD = struct.Struct("<BBBx")
_ALIGN = 16
_DIM = struct.Struct("<Q")

# dtype code -> (numpy dtype used for the bytes, torch dtype or None if numpy has it natively)
_CODES: dict[int, tuple[np.dtype, torch.dtype]] = {
    1: (np.dtype("bool"), torch.bool),
    2: (np.dtype("<u1"), torch.uint8),
    3: (np.dtype("<i1"), torch.int8),
    4: (np.dtype("<i2"), torch.int16),
    5: (np.dtype("<u2"), torch.uint16),
    6: (np.dtype("<i4"), torch.int32),
    7: (np.dtype("<u4"), torch.uint32),
    8: (np.dtype("<i8"), torch.int64),
    9: (np.dtype("<u8"), torch.uint64),
    10: (np.dtype("<f2"), torch.float16),
    11: (np.dtype("<f4"), torch.float32),
    12: (np.dtype("<f8"), torch.float64),
    13: (np.dtype("<c8"), torch.complex64),
    14: (np.dtype("<c16"), torch.complex128),
    15: (np.dtype("<u2"), torch.bfloat16),  # bytes carried as uint16, viewed as bfloat16
}
_NUMPY_TO_CODE = {np_dtype: code for code, (np_dtype, _) in _CODES.items() if code != 15}
_TORCH_TO_CODE = {t_dtype: code for code, (_, t_dtype) in _CODES.items()}


def _numpy_code(dtype: np.dtype) -> int:
    code = _NUMPY_TO_CODE.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if code is None:
        raise TypeError(f"numpy dtype {dtype} cannot be sent (supported: bool, ints, floats, complex)")
    return code


def _data_offset(ndim: int) -> int:
    size = _HEAD.size + ndim * _DIM.size
    return -(-size // _ALIGN) * _ALIGN


def _ext_from_parts(kind: int, code: int, shape: tuple[int, ...], raw: memoryview) -> msgpack.ExtType:
    if len(shape) > 255:
        raise TypeError("tensors with more than 255 dimensions cannot be sent")
    head = _HEAD.pack(kind, code, len(shape)) + b"".join(_DIM.pack(d) for d in shape)
    head += b"\x00" * (_data_offset(len(shape)) - len(head))
    return msgpack.ExtType(TENSOR_EXT, b"".join((head, raw)))


def _encode_numpy(arr: np.ndarray) -> msgpack.ExtType:
    code = _numpy_code(arr.dtype)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    return _ext_from_parts(_KIND_NUMPY, code, arr.shape, memoryview(arr.reshape(-1)).cast("B"))


def _encode_torch(tensor: torch.Tensor) -> msgpack.ExtType:
    code = _TORCH_TO_CODE.get(tensor.dtype)
    if code is None:
        raise TypeError(f"torch dtype {tensor.dtype} cannot be sent")
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.detach().contiguous()
    shape = tuple(tensor.shape)
    if code == 15:
        tensor = tensor.view(torch.int16)
    arr = tensor.resolve_conj().resolve_neg().numpy()
    return _ext_from_parts(_KIND_TORCH, code, shape, memoryview(arr.reshape(-1)).cast("B"))


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _encode_torch(obj)
    if isinstance(obj, np.ndarray):
        return _encode_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_tensor(data: bytes) -> np.ndarray | torch.Tensor:
    if len(data) < _HEAD.size:
        raise BadMessage(Reason.BAD_TENSOR, "tensor header truncated")
    kind, code, ndim = _HEAD.unpack_from(data)
    if code not in _CODES or kind not in (_KIND_NUMPY, _KIND_TORCH):
        raise BadMessage(Reason.BAD_TENSOR, f"unknown tensor kind {kind} or dtype code {code}")
    offset = _data_offset(ndim)
    if len(data) < offset:
        raise BadMessage(Reason.BAD_TENSOR, "tensor shape truncated")
    shape = tuple(_DIM.unpack_from(data, _HEAD.size + i * _DIM.size)[0] for i in range(ndim))
    np_dtype, t_dtype = _CODES[code]
    count = 1
    for dim in shape:
        count *= dim
    if count * np_dtype.itemsize != len(data) - offset:
        raise BadMessage(
            Reason.BAD_TENSOR,
            f"tensor of shape {shape} and dtype {t_dtype} needs {count * np_dtype.itemsize} bytes, "
            f"got {len(data) - offset}",
        )
    if len(data) - offset <= 1:
        # CPython shares 0- and 1-byte bytes objects: never alias them.
        arr = np.frombuffer(data, dtype=np_dtype, offset=offset).reshape(shape).copy()
    else:
        arr = np.frombuffer(data, dtype=np_dtype, offset=offset).reshape(shape)
    if kind == _KIND_NUMPY:
        return arr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: documented above
        tensor = torch.from_numpy(arr)
    if code == 15:
        tensor = tensor.view(torch.bfloat16)
    return tensor


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TENSOR_EXT:
        return _decode_tensor(data)
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


def encode_parts(obj: Any) -> list[bytes | memoryview]:
    """`encode(obj)` as a list of pieces whose join is byte-for-byte `encode(obj)`; tensor data
    is referenced, not copied (the sender copies each byte once, into its chunk frames)."""
    packer = msgpack.Packer(default=_default, use_bin_type=True, datetime=False)
    parts: list[bytes | memoryview] = []
    small = bytearray()
    _walk(obj, packer, parts, small)  # a module function: a recursive closure would be a
    if small:                         # reference cycle holding the tensors until the next gc
        parts.append(bytes(small))
    return parts


def _walk(o: Any, packer: msgpack.Packer, parts: list[bytes | memoryview], small: bytearray) -> None:
    if isinstance(o, dict):
        small.extend(packer.pack_map_header(len(o)))
        for k, v in o.items():
            _walk(k, packer, parts, small)
            _walk(v, packer, parts, small)
    elif isinstance(o, (list, tuple, set, frozenset)):
        small.extend(packer.pack_array_header(len(o)))
        for v in o:
            _walk(v, packer, parts, small)
    elif isinstance(o, (torch.Tensor, np.ndarray)):
        head, raw = _raw_tensor(o)
        small.extend(_ext_head(len(head) + len(raw)) + head)
        if len(raw) < 4096:
            small.extend(raw)
        else:
            parts.append(bytes(small))
            small.clear()
            parts.append(raw)
    else:
        small.extend(packer.pack(o))


def _raw_tensor(obj: torch.Tensor | np.ndarray) -> tuple[bytes, memoryview]:
    """(our tensor header with its padding, the raw C-order little-endian bytes) -- no data copy."""
    if isinstance(obj, np.ndarray):
        code = _numpy_code(obj.dtype)
        if obj.dtype.byteorder == ">":
            obj = obj.astype(obj.dtype.newbyteorder("<"))
        if not obj.flags.c_contiguous:
            obj = obj.copy(order="C")
        kind, shape, arr = _KIND_NUMPY, obj.shape, obj
    else:
        code = _TORCH_TO_CODE.get(obj.dtype)
        if code is None:
            raise TypeError(f"torch dtype {obj.dtype} cannot be sent")
        tensor = obj.cpu() if obj.device.type != "cpu" else obj
        tensor = tensor.detach().contiguous()
        shape = tuple(tensor.shape)
        if code == 15:
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


def decode(data: bytes | bytearray | memoryview) -> Any:
    """The object `encode` produced; BadMessage if the bytes are not our msgpack."""
    try:
        return msgpack.unpackb(
            data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True
        )
    except BadMessage:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise BadMessage(Reason.NOT_MSGPACK, f"undecodable msgpack: {type(exc).__name__} {exc}") from exc
