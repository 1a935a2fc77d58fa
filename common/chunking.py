"""Splitting big payloads into chunks and putting them back together.

paho slows down on single messages much over 10 MB (it copies the buffer on every partial
send), so bodies above the chunk size travel as chunk frames followed by a manifest that
carries the sha256 of the whole. Frames are binary with a 4-byte tag so a receiver tells them
from an envelope (an envelope is a msgpack map and never starts with these bytes).
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from common import codec
from common.errors import BadMessage, Reason

CHUNK_TAG = b"FBMC"
MANIFEST_TAG = b"FBMM"
_CHUNK_HEAD = struct.Struct("<4s16sII")  # tag, transfer id, index, count
# 1 MiB: paho re-slices a message's remaining bytes on every partial socket write, which costs
# O(size^2 / socket buffer); at 1 MiB that is noise, at 8 MiB it halved throughput (benchmarks/transfer.py)
DEFAULT_CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    transfer: bytes
    count: int
    size: int
    sha256: bytes


def frames(parts: Iterable[bytes | bytearray | memoryview], size: int, chunk_size: int) -> Iterator[bytes | bytearray]:
    """The chunk frames of a `size`-byte payload arriving as `parts`, then its manifest (last).

    Frames are produced as the parts come, so the first chunk can be on the wire while the
    rest of the payload is still being produced (and hashed); each payload byte is copied once,
    into its frame.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    transfer = uuid.uuid4().bytes
    count = max(1, -(-size // chunk_size))
    digest = hashlib.sha256()
    head = _CHUNK_HEAD.size
    index, filled, seen = 0, 0, 0
    frame = _new_frame(transfer, 0, count, min(chunk_size, size), head)
    for part in parts:
        view = memoryview(part).cast("B")
        seen += len(view)
        if seen > size:
            raise ValueError(f"the parts hold more than the {size} bytes announced")
        while len(view):
            room = len(frame) - head - filled
            take = min(room, len(view))
            frame[head + filled : head + filled + take] = view[:take]
            filled += take
            view = view[take:]
            if filled == len(frame) - head:
                digest.update(memoryview(frame)[head:])
                yield frame
                index += 1
                if index < count:
                    frame = _new_frame(transfer, index, count, min(chunk_size, size - index * chunk_size), head)
                    filled = 0
    if seen != size:
        raise ValueError(f"the parts hold {seen} bytes, {size} were announced")
    if size == 0:
        yield frame
    yield MANIFEST_TAG + codec.encode({"t": transfer, "n": count, "size": size, "sha256": digest.digest()})


def _new_frame(transfer: bytes, index: int, count: int, data_len: int, head: int) -> bytearray:
    frame = bytearray(head + data_len)
    _CHUNK_HEAD.pack_into(frame, 0, CHUNK_TAG, transfer, index, count)
    return frame


def split(payload: bytes, chunk_size: int) -> tuple[list[bytes | bytearray], bytes]:
    """Chunk frames and the manifest frame for `payload` (send the manifest last)."""
    out = list(frames([payload], len(payload), chunk_size))
    return out[:-1], bytes(out[-1])


def frame_kind(payload: bytes) -> str:
    """'chunk', 'manifest', 'empty' or 'message'."""
    if not payload:
        return "empty"
    head = payload[:4]
    if head == CHUNK_TAG:
        return "chunk"
    if head == MANIFEST_TAG:
        return "manifest"
    return "message"


def parse_manifest(payload: bytes) -> Manifest:
    try:
        raw = codec.decode(memoryview(payload)[4:])
    except BadMessage as exc:
        raise BadMessage(Reason.BAD_CHUNK, f"undecodable manifest: {exc.detail}") from None
    try:
        manifest = Manifest(bytes(raw["t"]), int(raw["n"]), int(raw["size"]), bytes(raw["sha256"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadMessage(Reason.BAD_CHUNK, f"malformed manifest: {exc}") from None
    if manifest.count < 1 or manifest.size < 0 or len(manifest.sha256) != 32:
        raise BadMessage(Reason.BAD_CHUNK, "manifest has impossible values")
    return manifest


def parse_chunk(payload: bytes) -> tuple[bytes, int, int, memoryview]:
    """(transfer id, index, count, data view) of a chunk frame."""
    if len(payload) < _CHUNK_HEAD.size:
        raise BadMessage(Reason.BAD_CHUNK, "chunk frame truncated")
    _, transfer, index, count = _CHUNK_HEAD.unpack_from(payload)
    if index >= count:
        raise BadMessage(Reason.BAD_CHUNK, f"chunk index {index} >= count {count}")
    return transfer, index, count, memoryview(payload)[_CHUNK_HEAD.size :]


@dataclass
class _Pending:
    """One transfer being put together, in place: chunk i lands at i x chunk_len of `whole`."""

    count: int
    whole: bytearray | None = None
    chunk_len: int = 0  # data length of every chunk but the last
    got: dict[int, int] = field(default_factory=dict)  # index -> data length
    early_last: bytes | None = None  # the last chunk, if it came before any other
    manifest: Manifest | None = None
    created: float = field(default_factory=time.monotonic)
    nbytes: int = 0  # what this transfer holds in memory
    digest: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0  # chunks 0..hashed-1 are in the digest (they mostly come in order)
    span: tuple[int, int] | None = None  # the byte range `span_of` found in chunk 0
    span_digest: Any = field(default_factory=hashlib.sha256)


class Whole(bytearray):
    """A reassembled payload; `span_sha256` is the sha256 of the `span_of` range, computed as
    the chunks arrived (None if they came out of order), so the receiver need not hash again."""

    span: tuple[int, int] | None = None
    span_sha256: bytes | None = None


class Reassembler:
    """Collects chunks per (stream, transfer) and yields whole, verified payloads.

    A stream is the main topic the chunks belong to. Chunks and the manifest may come in any
    order (retained chunks live on sub-topics); a transfer completes when its manifest and all
    its chunks are in. Each chunk is copied into the final buffer as it arrives and hashed if
    it is next in order, so the payload is held once and checked almost as soon as the last
    chunk lands. Memory is bounded: the oldest incomplete transfers are dropped first.
    """

    def __init__(self, max_bytes: int = 2 * 1024**3, max_age_s: float = 600.0,
                 span_of: Callable[[memoryview], tuple[int, int] | None] | None = None) -> None:
        self._span_of = span_of
        self._pending: dict[tuple[str, bytes], _Pending] = {}
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._bytes = 0
        self._finished: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add_chunk(self, stream: str, payload: bytes) -> bytearray | None:
        transfer, index, count, data = parse_chunk(payload)
        key = (stream, transfer)
        if key in self._finished:
            return None  # a redelivered chunk of a transfer already handed over
        entry = self._pending.setdefault(key, _Pending(count))
        if count != entry.count:
            raise BadMessage(Reason.BAD_CHUNK, f"chunk says {count} chunks, earlier ones said {entry.count}")
        if index in entry.got:
            return None
        if index == count - 1 and entry.whole is None and count > 1:
            entry.early_last = bytes(data)  # its length says nothing of the others': wait for one
            entry.got[index] = len(data)
            self._account(entry, len(data))
        else:
            self._place(entry, index, data)
            if entry.early_last is not None:
                self._account(entry, -len(entry.early_last))
                last, entry.early_last = entry.early_last, None
                del entry.got[count - 1]
                self._place(entry, count - 1, memoryview(last))
        self._evict(keep=key)
        return self._complete(stream, transfer)

    def _place(self, entry: _Pending, index: int, data: memoryview) -> None:
        if entry.whole is None:
            entry.chunk_len = len(data)
            capacity = entry.count * entry.chunk_len
            if capacity > self._max_bytes:
                raise BadMessage(Reason.TOO_LARGE, f"{entry.count} chunks of {entry.chunk_len} bytes exceed the limit of {self._max_bytes}")
            entry.whole = Whole(capacity)
            self._account(entry, capacity)
        last = index == entry.count - 1
        if (not last and len(data) != entry.chunk_len) or len(data) > entry.chunk_len:
            raise BadMessage(Reason.BAD_CHUNK, f"chunk {index} holds {len(data)} bytes, the others {entry.chunk_len}")
        offset = index * entry.chunk_len
        entry.whole[offset : offset + len(data)] = data
        entry.got[index] = len(data)
        while entry.hashed in entry.got and entry.hashed < entry.count and (entry.hashed != entry.count - 1 or entry.early_last is None):
            start = entry.hashed * entry.chunk_len
            piece = memoryview(entry.whole)[start : start + entry.got[entry.hashed]]
            entry.digest.update(piece)
            if entry.hashed == 0 and self._span_of is not None:
                entry.span = self._span_of(piece)
            if entry.span is not None:
                lo, hi = max(entry.span[0], start), min(entry.span[1], start + len(piece))
                if lo < hi:
                    entry.span_digest.update(memoryview(entry.whole)[lo:hi])
            entry.hashed += 1

    def _account(self, entry: _Pending, delta: int) -> None:
        entry.nbytes += delta
        self._bytes += delta

    def add_manifest(self, stream: str, payload: bytes) -> bytearray | None:
        manifest = parse_manifest(payload)
        if manifest.size > self._max_bytes:
            raise BadMessage(Reason.TOO_LARGE, f"manifest declares {manifest.size} bytes; the limit is {self._max_bytes}")
        if (stream, manifest.transfer) in self._finished:
            return None
        entry = self._pending.setdefault((stream, manifest.transfer), _Pending(manifest.count))
        entry.manifest = manifest
        return self._complete(stream, manifest.transfer)

    def _complete(self, stream: str, transfer: bytes) -> bytearray | None:
        entry = self._pending[(stream, transfer)]
        manifest = entry.manifest
        if manifest is None or len(entry.got) < manifest.count:
            return None
        self._drop((stream, transfer))
        self._finished[(stream, transfer)] = None
        if len(self._finished) > 4096:
            self._finished.popitem(last=False)
        if manifest.count != entry.count or any(i not in entry.got for i in range(manifest.count)):
            raise BadMessage(Reason.BAD_CHUNK, "chunk indices do not match the manifest")
        total = sum(entry.got.values())
        if total != manifest.size:
            raise BadMessage(Reason.BAD_CHUNK, f"got {total} bytes, manifest says {manifest.size}")
        whole = entry.whole if entry.whole is not None else Whole(entry.early_last or b"")
        del whole[manifest.size :]  # the last chunk is shorter than the room kept for it
        in_order = entry.hashed == manifest.count
        digest = entry.digest.digest() if in_order else hashlib.sha256(whole).digest()
        if digest != manifest.sha256:
            raise BadMessage(Reason.CHECKSUM_MISMATCH, "reassembled payload does not match its sha256")
        if in_order and entry.span is not None and entry.span[1] <= manifest.size:
            whole.span, whole.span_sha256 = entry.span, entry.span_digest.digest()
        return whole

    def _drop(self, key: tuple[str, bytes]) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def _evict(self, keep: tuple[str, bytes]) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._pending.items() if now - e.created > self._max_age_s]:
            if key != keep:
                self._drop(key)
        while self._bytes > self._max_bytes and len(self._pending) > 1:
            oldest = min((k for k in self._pending if k != keep), key=lambda k: self._pending[k].created)
            self._drop(oldest)
