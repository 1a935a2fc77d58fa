"""Chunk frames and reassembly: any order, duplicates, corruption, bounded memory."""

from __future__ import annotations

import os
import random

import pytest

from common import chunking
from common.errors import BadMessage, Reason


def test_split_and_reassemble_in_any_order():
    payload = os.urandom(100_003)
    frames, manifest = chunking.split(payload, 10_000)
    assert len(frames) == 11
    order = frames + frames[:3]  # duplicates too
    random.Random(1).shuffle(order)
    r = chunking.Reassembler()
    results = [r.add_chunk("t", f) for f in order[:5]]
    results.append(r.add_manifest("t", manifest))
    results += [r.add_chunk("t", f) for f in order[5:]]
    done = [x for x in results if x is not None]
    assert len(done) == 1 and bytes(done[0]) == payload
    assert r.pending_bytes == 0


def test_frames_are_told_apart_from_envelopes():
    frames, manifest = chunking.split(b"x" * 10, 4)
    assert {chunking.frame_kind(f) for f in frames} == {"chunk"}
    assert chunking.frame_kind(manifest) == "manifest"
    assert chunking.frame_kind(b"\x8a\xa1v") == "message"
    assert chunking.frame_kind(b"") == "empty"


def test_corrupted_chunk_fails_the_checksum():
    frames, manifest = chunking.split(os.urandom(1000), 300)
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    r = chunking.Reassembler()
    for f in [frames[0], bytes(bad), *frames[2:]]:
        r.add_chunk("t", f)
    with pytest.raises(BadMessage) as err:
        r.add_manifest("t", manifest)
    assert err.value.reason == Reason.CHECKSUM_MISMATCH


def test_streams_and_transfers_do_not_mix():
    a, b = os.urandom(500), os.urandom(500)
    fa, ma = chunking.split(a, 100)
    fb, mb = chunking.split(b, 100)
    r = chunking.Reassembler()
    for x, y in zip(fa, fb, strict=True):
        r.add_chunk("s1", x)
        r.add_chunk("s2", y)
    assert bytes(r.add_manifest("s2", mb)) == b
    assert r.add_manifest("s2", ma) is None  # a's chunks went to s1
    assert bytes(r.add_manifest("s1", ma)) == a


def test_memory_is_bounded_by_dropping_the_oldest_transfer():
    r = chunking.Reassembler(max_bytes=1000)
    old, _ = chunking.split(os.urandom(900), 300)
    new, new_manifest = chunking.split(os.urandom(900), 300)
    for f in old[:2]:
        r.add_chunk("t", f)
    for f in new:
        r.add_chunk("t", f)
    assert r.pending_bytes <= 1000
    assert r.add_manifest("t", new_manifest) is not None


@pytest.mark.parametrize("payload", [b"FBMC", b"FBMC" + b"\x00" * 16 + (5).to_bytes(4, "little") + (2).to_bytes(4, "little")])
def test_malformed_chunks_are_refused(payload):
    with pytest.raises(BadMessage) as err:
        chunking.Reassembler().add_chunk("t", payload)
    assert err.value.reason == Reason.BAD_CHUNK


def test_malformed_manifest_is_refused():
    with pytest.raises(BadMessage):
        chunking.Reassembler().add_manifest("t", b"FBMM" + b"\x80")


def test_every_arrival_order_gives_the_payload_held_once():
    import itertools
    import random

    from common.chunking import Reassembler, frames

    payload = random.Random(1).randbytes(10 * 1000 + 7)
    out = list(frames([payload[:3000], memoryview(payload)[3000:]], len(payload), 1000))
    chunks, manifest = out[:-1], out[-1]
    assert len(chunks) == 11 and all(len(c) == 1000 + 28 for c in chunks[:-1])
    orders = [list(range(11)), list(range(10, -1, -1))] + [random.Random(s).sample(range(11), 11) for s in range(20)]
    for order in orders:
        for manifest_at in (0, 5, 11):
            r = Reassembler(max_bytes=1 << 20)
            got = None
            sequence = [chunks[i] for i in order]
            sequence.insert(manifest_at, manifest)
            for frame in sequence:
                done = r.add_manifest("s", frame) if frame is manifest else r.add_chunk("s", frame)
                got = done or got
            assert bytes(got) == payload and r.pending_bytes == 0
    assert list(itertools.islice(frames([b""], 0, 8), 2))[0][:4] == b"FBMC"  # an empty payload is one empty chunk


def test_a_chunk_that_lies_about_its_size_or_count_is_refused():
    import pytest

    from common.chunking import Reassembler, frames
    from common.errors import BadMessage

    out = list(frames([bytes(5000)], 5000, 1000))
    r = Reassembler(max_bytes=1 << 20)
    r.add_chunk("s", out[0])
    with pytest.raises(BadMessage, match="holds"):
        r.add_chunk("s", bytes(out[1][:-10]))  # a middle chunk shorter than the first
    other = list(frames([bytes(5000)], 5000, 1000))
    bad = bytearray(other[1])
    bad[24:28] = (9).to_bytes(4, "little")  # count 9 where the transfer said 5
    r.add_chunk("t", other[0])
    with pytest.raises(BadMessage, match="earlier ones said"):
        r.add_chunk("t", bytes(bad))
    small = Reassembler(max_bytes=3000)
    with pytest.raises(BadMessage, match="exceed the limit"):
        small.add_chunk("u", out[0])  # 5 x 1000 bytes announced, 3000 allowed: refused before allocating


class _Log:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def warning(self, event: str, **kw) -> None:
        self.events.append({"event": event, **kw})


def _greedy(transfer: bytes, count: int, data_len: int, index: int = 0) -> bytes:
    import struct

    return struct.pack("<4s16sII", chunking.CHUNK_TAG, transfer, index, count) + bytes(data_len)


def test_a_chunk_claiming_many_more_costs_only_what_arrived():
    import tracemalloc

    r = chunking.Reassembler(limits=chunking.Limits(max_bytes=4 << 30, stream_bytes=4 << 30, message_bytes=4 << 30))
    frame = _greedy(os.urandom(16), 2048, 1 << 20)  # claims 2 GiB
    tracemalloc.start()
    assert r.add_chunk("t", frame) is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r.pending_bytes == 1 << 20 and peak < 3 << 20, peak


def test_a_topic_over_its_budget_or_partial_cap_loses_its_oldest_transfer_and_says_why():
    log = _Log()
    r = chunking.Reassembler(limits=chunking.Limits(max_bytes=10_000, stream_bytes=2_500, stream_partial=2,
                                                    message_bytes=5_000), log=log)
    other, other_manifest = chunking.split(os.urandom(2_000), 1_000)
    r.add_chunk("b", other[0])  # another topic's transfer: untouched by topic a's excess
    firsts = [_greedy(os.urandom(16), 2, 1_000) for _ in range(3)]
    r.add_chunk("a", firsts[0])
    r.add_chunk("a", firsts[1])
    r.add_chunk("a", firsts[2])  # a third partial on topic a: the oldest goes
    assert [e["reason"] for e in log.events] == ["more than 2 incomplete messages on this topic"]
    r.add_chunk("a", _greedy(firsts[2][4:20], 2, 1_000, index=1))  # 3000 bytes on topic a: over 2500
    assert log.events[-1]["reason"] == "over the topic's budget of 2500 bytes" and log.events[-1]["topic"] == "a"
    assert r.add_chunk("a", firsts[1]) is None  # a dropped transfer's later chunks are ignored
    assert r.pending_bytes == 2_000 + 1_000
    with pytest.raises(BadMessage) as err:  # claims 3 x 1000, over the topic's 2500: refused before it is held
        r.add_chunk("a", _greedy(os.urandom(16), 3, 1_000))
    assert err.value.reason == Reason.TOO_LARGE
    assert r.add_chunk("b", other[1]) is None and r.add_manifest("b", other_manifest) is not None
