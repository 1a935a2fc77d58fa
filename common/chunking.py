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
from dataclasses import dataclass, field

from common import codec
from common.errors import BadMessage, Reason

CHUNK_TAG = b"FBMC"
MANIFEST_TAG = b"FBMM"
_CHUNK_HEAD = struct.Struct("<4s16sII")  # tag, transfer id, index, count
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    transfer: bytes
    count: int
    size: int
    sha256: bytes


def split(payload: bytes, chunk_size: int) -> tuple[list[bytes], bytes]:
    """Chunk frames and the manifest frame for `payload` (send the manifest last)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    transfer = uuid.uuid4().bytes
    view = memoryview(payload)
    count = max(1, -(-len(payload) // chunk_size))
    frames = [
        b"".join((_CHUNK_HEAD.pack(CHUNK_TAG, transfer, i, count), view[i * chunk_size : (i + 1) * chunk_size]))
        for i in range(count)
    ]
    manifest = MANIFEST_TAG + codec.encode(
        {"t": transfer, "n": count, "size": len(payload), "sha256": hashlib.sha256(view).digest()}
    )
    return frames, manifest


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
    chunks: dict[int, memoryview] = field(default_factory=dict)
    manifest: Manifest | None = None
    created: float = field(default_factory=time.monotonic)
    nbytes: int = 0


class Reassembler:
    """Collects chunks per (stream, transfer) and yields whole, verified payloads.

    A stream is the main topic the chunks belong to. Chunks and the manifest may come in any
    order (retained chunks live on sub-topics); a transfer completes when its manifest and all
    its chunks are in. Memory is bounded: the oldest incomplete transfers are dropped first.
    """

    def __init__(self, max_bytes: int = 2 * 1024**3, max_age_s: float = 600.0) -> None:
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
        if (stream, transfer) in self._finished:
            return None  # a redelivered chunk of a transfer already handed over
        entry = self._pending.setdefault((stream, transfer), _Pending())
        if index not in entry.chunks:
            entry.chunks[index] = data
            entry.nbytes += len(data)
            self._bytes += len(data)
        self._evict(keep=(stream, transfer))
        return self._complete(stream, transfer)

    def add_manifest(self, stream: str, payload: bytes) -> bytearray | None:
        manifest = parse_manifest(payload)
        if manifest.size > self._max_bytes:
            raise BadMessage(Reason.TOO_LARGE, f"manifest declares {manifest.size} bytes; the limit is {self._max_bytes}")
        if (stream, manifest.transfer) in self._finished:
            return None
        entry = self._pending.setdefault((stream, manifest.transfer), _Pending())
        entry.manifest = manifest
        return self._complete(stream, manifest.transfer)

    def _complete(self, stream: str, transfer: bytes) -> bytearray | None:
        entry = self._pending[(stream, transfer)]
        manifest = entry.manifest
        if manifest is None or len(entry.chunks) < manifest.count:
            return None
        self._drop((stream, transfer))
        self._finished[(stream, transfer)] = None
        if len(self._finished) > 4096:
            self._finished.popitem(last=False)
        if any(i not in entry.chunks for i in range(manifest.count)):
            raise BadMessage(Reason.BAD_CHUNK, "chunk indices do not match the manifest")
        if entry.nbytes != manifest.size:  # checked before allocating what the manifest claims
            raise BadMessage(Reason.BAD_CHUNK, f"got {entry.nbytes} bytes, manifest says {manifest.size}")
        whole = bytearray(manifest.size)
        offset = 0
        for i in range(manifest.count):
            part = entry.chunks[i]
            if offset + len(part) > manifest.size:
                raise BadMessage(Reason.BAD_CHUNK, "chunks are larger than the manifest says")
            whole[offset : offset + len(part)] = part
            offset += len(part)
        if offset != manifest.size:
            raise BadMessage(Reason.BAD_CHUNK, f"got {offset} bytes, manifest says {manifest.size}")
        if hashlib.sha256(whole).digest() != manifest.sha256:
            raise BadMessage(Reason.CHECKSUM_MISMATCH, "reassembled payload does not match its sha256")
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
