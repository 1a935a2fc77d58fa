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

import structlog

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
    """One transfer being put together. Chunks that arrive in order are appended to `whole`
    (and hashed); others wait in `early` until those before them are in. Memory follows the
    bytes that arrived, never the count a frame claims."""

    count: int
    whole: Whole = field(default_factory=lambda: Whole())
    chunk_len: int = 0  # data length of every chunk but the last (0: none of those seen yet)
    next: int = 0  # chunks 0..next-1 are in `whole`
    early: dict[int, memoryview] = field(default_factory=dict)  # index -> data, ahead of `next`
    manifest: Manifest | None = None
    created: float = field(default_factory=time.monotonic)
    nbytes: int = 0  # what this transfer holds in memory
    digest: Any = field(default_factory=hashlib.sha256)
    span: tuple[int, int] | None = None  # the byte range `span_of` found in chunk 0
    span_digest: Any = field(default_factory=hashlib.sha256)

    @property
    def received(self) -> int:
        return self.next + len(self.early)


class Whole(bytearray):
    """A reassembled payload; `span_sha256` is the sha256 of the `span_of` range, computed as
    the chunks arrived, so the receiver need not hash again."""

    span: tuple[int, int] | None = None
    span_sha256: bytes | None = None


@dataclass(frozen=True)
class Limits:
    """What incomplete transfers may hold: `max_bytes` in all; per stream (topic: the sender is
    not known before the signature is checked) `stream_bytes` and `stream_partial` transfers;
    `max_partial` transfers in all. One transfer may claim at most `message_bytes`."""

    max_bytes: int = 2 * 1024**3
    stream_bytes: int = 2 * 1024**3
    stream_partial: int = 4
    max_partial: int = 4096
    message_bytes: int = 2 * 1024**3

    @property
    def transfer_bytes(self) -> int:
        return min(self.max_bytes, self.stream_bytes, self.message_bytes)


Key = tuple[str, bytes]


class Reassembler:
    """Collects chunks per (stream, transfer) and yields whole, verified payloads.

    A stream is the main topic the chunks belong to. Chunks and the manifest may come in any
    order (retained chunks live on sub-topics); a transfer completes when its manifest and all
    its chunks are in. Each chunk is appended to the transfer's buffer once those before it are
    in, and hashed then, so the payload is held once and checked as soon as the last chunk
    lands. Memory is bounded by `Limits`: over a limit the oldest incomplete transfers (of the
    stream, then of all) are dropped with a logged reason.
    """

    def __init__(self, max_bytes: int = 2 * 1024**3, max_age_s: float = 600.0,
                 span_of: Callable[[memoryview], tuple[int, int] | None] | None = None,
                 limits: Limits | None = None, log: Any = None) -> None:
        self._span_of = span_of
        self._pending: dict[Key, _Pending] = {}
        self._limits = limits or Limits(max_bytes=max_bytes, stream_bytes=max_bytes, message_bytes=max_bytes)
        self._max_bytes = self._limits.max_bytes
        self._max_age_s = max_age_s
        self._bytes = 0
        self._stream_bytes: dict[str, int] = {}
        self._finished: OrderedDict[Key, None] = OrderedDict()
        self._log = log or structlog.get_logger("chunking")

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add_chunk(self, stream: str, payload: bytes) -> bytearray | None:
        transfer, index, count, data = parse_chunk(payload)
        key = (stream, transfer)
        if key in self._finished:
            return None  # a redelivered chunk of a transfer already handed over (or dropped)
        entry = self._pending.get(key) or self._open(key, count)
        if count != entry.count:
            raise BadMessage(Reason.BAD_CHUNK, f"chunk says {count} chunks, earlier ones said {entry.count}")
        if index < entry.next or index in entry.early:
            return None
        self._check_length(key, entry, index, len(data))
        if index == entry.next:
            self._append(entry, data)
            while entry.next in entry.early:
                self._append(entry, entry.early.pop(entry.next))
        else:
            entry.early[index] = data if isinstance(payload, bytes) else memoryview(bytes(data))  # no copy of bytes
        self._account(stream, entry, len(data))
        self._enforce(key)
        return self._complete(stream, transfer)

    def _open(self, key: Key, count: int) -> _Pending:
        """A new pending transfer, after making room for it under the transfer-count caps."""
        same = [k for k in self._pending if k[0] == key[0]]
        if len(same) >= self._limits.stream_partial:
            self._drop(self._oldest(same), f"more than {self._limits.stream_partial} incomplete messages on this topic")
        if len(self._pending) >= self._limits.max_partial:
            self._drop(self._oldest(list(self._pending)), f"more than {self._limits.max_partial} incomplete messages in all")
        entry = self._pending[key] = _Pending(count)
        return entry

    def _check_length(self, key: Key, entry: _Pending, index: int, length: int) -> None:
        """Every chunk but the last has the length of the others, the last no more; and what
        the chunks claim in all (count x length) is within the limit, refused before it is held."""
        if index == entry.count - 1:
            if entry.chunk_len and length > entry.chunk_len:
                raise BadMessage(Reason.BAD_CHUNK, f"chunk {index} holds {length} bytes, the others {entry.chunk_len}")
            return
        if entry.chunk_len and length != entry.chunk_len:
            raise BadMessage(Reason.BAD_CHUNK, f"chunk {index} holds {length} bytes, the others {entry.chunk_len}")
        if not entry.chunk_len:
            claimed, limit = entry.count * length, self._limits.transfer_bytes
            if claimed > limit:
                self._drop(key)  # the BadMessage is the logged reason
                raise BadMessage(Reason.TOO_LARGE, f"{entry.count} chunks of {length} bytes exceed the limit of {limit}")
            last = entry.early.get(entry.count - 1)
            if last is not None and len(last) > length:
                raise BadMessage(Reason.BAD_CHUNK, f"chunk {entry.count - 1} holds {len(last)} bytes, the others {length}")
            entry.chunk_len = length

    def _append(self, entry: _Pending, data: memoryview) -> None:
        """Chunk `entry.next` joins the buffer (one copy) and the running hashes."""
        start = len(entry.whole)
        entry.whole += data
        entry.digest.update(data)
        if entry.next == 0 and self._span_of is not None:
            entry.span = self._span_of(data)
        if entry.span is not None:
            lo, hi = max(entry.span[0], start), min(entry.span[1], start + len(data))
            if lo < hi:
                entry.span_digest.update(data[lo - start : hi - start])
        entry.next += 1

    def _account(self, stream: str, entry: _Pending, delta: int) -> None:
        entry.nbytes += delta
        self._bytes += delta
        self._stream_bytes[stream] = self._stream_bytes.get(stream, 0) + delta

    def add_manifest(self, stream: str, payload: bytes) -> bytearray | None:
        manifest = parse_manifest(payload)
        limit = self._limits.transfer_bytes
        if manifest.size > limit:
            raise BadMessage(Reason.TOO_LARGE, f"manifest declares {manifest.size} bytes; the limit is {limit}")
        key = (stream, manifest.transfer)
        if key in self._finished:
            return None
        entry = self._pending.get(key) or self._open(key, manifest.count)
        entry.manifest = manifest
        return self._complete(stream, manifest.transfer)

    def _complete(self, stream: str, transfer: bytes) -> bytearray | None:
        key = (stream, transfer)
        entry = self._pending.get(key)
        manifest = entry.manifest if entry is not None else None
        if entry is None or manifest is None or entry.received < manifest.count:
            return None
        self._drop(key)
        if manifest.count != entry.count or entry.next != manifest.count:
            raise BadMessage(Reason.BAD_CHUNK, "chunk indices do not match the manifest")
        whole = entry.whole
        if len(whole) != manifest.size:
            raise BadMessage(Reason.BAD_CHUNK, f"got {len(whole)} bytes, manifest says {manifest.size}")
        if entry.digest.digest() != manifest.sha256:
            raise BadMessage(Reason.CHECKSUM_MISMATCH, "reassembled payload does not match its sha256")
        if entry.span is not None and entry.span[1] <= manifest.size:
            whole.span, whole.span_sha256 = entry.span, entry.span_digest.digest()
        return whole

    def _drop(self, key: Key, reason: str | None = None) -> None:
        """Forget a transfer: finished, or (with a `reason`, logged) given up, its later chunks ignored."""
        entry = self._pending.pop(key, None)
        self._finished[key] = None
        if len(self._finished) > 4096:
            self._finished.popitem(last=False)
        if entry is None:
            return
        self._bytes -= entry.nbytes
        left = self._stream_bytes.pop(key[0], 0) - entry.nbytes
        if left:
            self._stream_bytes[key[0]] = left
        if reason is not None:
            self._log.warning("transfer_dropped", topic=key[0], reason=reason, held_bytes=entry.nbytes,
                              chunks=f"{entry.received}/{entry.count}")

    def _oldest(self, keys: list[Key]) -> Key:
        return min(keys, key=lambda k: self._pending[k].created)

    def _enforce(self, keep: Key) -> None:
        """Drop what is too old, then the oldest transfers while a byte budget is exceeded
        (the stream's, then the total); `keep` (just added to) goes last."""
        now = time.monotonic()
        for key in [k for k, e in self._pending.items() if now - e.created > self._max_age_s and k != keep]:
            self._drop(key, f"incomplete after {self._max_age_s:.0f}s")
        stream = keep[0]
        while self._stream_bytes.get(stream, 0) > self._limits.stream_bytes:
            if not self._drop_one([k for k in self._pending if k[0] == stream], keep,
                                  f"over the topic's budget of {self._limits.stream_bytes} bytes"):
                break
        while self._bytes > self._max_bytes:
            if not self._drop_one(list(self._pending), keep, f"over the total budget of {self._max_bytes} bytes"):
                break

    def _drop_one(self, keys: list[Key], keep: Key, reason: str) -> bool:
        """Drop the oldest of `keys` other than `keep`, or `keep` if it is alone; False if none."""
        others = [k for k in keys if k != keep]
        if not others and keep not in keys:
            return False
        self._drop(self._oldest(others) if others else keep, reason)
        return True
