"""Length-prefixed msgpack frames over a stream socket: how the node and its training child talk.

The child runs someone else's code, so what it writes is untrusted input: nothing read here is
ever unpickled. A frame is a 12-byte header (magic `FBM1`, u64 big-endian body length) and a
body in the project's tensor codec (`common.codec`). A reader states the largest body it
accepts and a deadline; a header that lies, a body too big, a stall or undecodable bytes raise
`FrameError` before anything is built from them. Tensor bytes are sent from their own memory
(`encode_parts`) and received into one buffer, which the codec decodes with its one copy.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from common.codec import decode, encode_parts
from common.errors import BadMessage

MAGIC = b"FBM1"
_HEADER = struct.Struct(">4sQ")
HEADER_SIZE = _HEADER.size


class FrameError(RuntimeError):
    """The peer broke the framing: bad header, body over the limit, stall, EOF or bad msgpack."""


def send_frame(sock: socket.socket, obj: Any) -> int:
    """Write `obj` as one frame; the number of body bytes. Tensor data is not copied."""
    parts = encode_parts(obj)
    size = sum(len(p) for p in parts)
    sock.sendall(_HEADER.pack(MAGIC, size))
    for part in parts:
        sock.sendall(part)
    return size


def _read_into(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fill `view` from the socket, or FrameError on EOF or when the deadline passes."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrameError(f"the peer stalled after {got} of {len(view)} bytes")
            sock.settimeout(left)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError as exc:
            raise FrameError(f"the peer stalled after {got} of {len(view)} bytes") from exc
        if n == 0:
            raise FrameError("the peer closed the connection" + (f" mid-frame ({got} bytes)" if got else ""))
        got += n


def recv_frame(sock: socket.socket, max_bytes: int, deadline: float | None = None, *,
               torch_tensors: bool = True) -> Any:
    """Read one frame and decode it; FrameError if it is malformed, bigger than `max_bytes` or late.
    `torch_tensors` false: tensors come out numpy-held (`common.codec.decode`), torch not imported."""
    head = bytearray(HEADER_SIZE)
    _read_into(sock, memoryview(head), deadline)
    magic, size = _HEADER.unpack(head)
    if magic != MAGIC:
        raise FrameError(f"not a frame (header starts {bytes(head[:4])!r}, expected {MAGIC!r})")
    if size > max_bytes:
        raise FrameError(f"frame of {size} bytes is over the {max_bytes}-byte limit")
    body = bytearray(size)
    _read_into(sock, memoryview(body), deadline)
    try:
        return decode(body, torch_tensors)
    except BadMessage as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc
