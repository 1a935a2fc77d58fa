"""Frames between the node and its training child: round trips, and refusals before decoding."""

from __future__ import annotations

import pickle
import socket
import struct
import time

import pytest
import torch

from common.frames import HEADER_SIZE, MAGIC, FrameError, recv_frame, send_frame


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_frame_round_trips_tensors_and_scalars(pair):
    a, b = pair
    obj = {"params": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, "n": 3, "ok": True}
    size = send_frame(a, obj)
    got = recv_frame(b, max_bytes=size)
    assert got["n"] == 3 and got["ok"] is True and torch.equal(got["params"]["w"], obj["params"]["w"])


def test_a_pickle_is_not_a_frame(pair):
    a, b = pair
    data = pickle.dumps({"ok": True})
    a.sendall(struct.pack("!i", len(data)) + data)
    with pytest.raises(FrameError, match="not a frame"):
        recv_frame(b, max_bytes=1 << 20)


def test_an_oversized_frame_is_refused_from_its_header(pair):
    a, b = pair
    a.sendall(MAGIC + (1 << 40).to_bytes(8, "big"))  # no body follows: it must not be awaited
    with pytest.raises(FrameError, match="over the"):
        recv_frame(b, max_bytes=1 << 20)


def test_undecodable_bytes_and_unknown_ext_types_are_refused(pair):
    a, b = pair
    for body in (b"\xc1", b"\xd4\x07\x00"):  # a reserved byte; an ext type we never send (pickle's stand-in)
        a.sendall(MAGIC + len(body).to_bytes(8, "big") + body)
        with pytest.raises(FrameError, match="undecodable"):
            recv_frame(b, max_bytes=1 << 20)


def test_a_stalled_or_closed_peer_is_an_error_not_a_hang(pair):
    a, b = pair
    a.sendall(MAGIC + (100).to_bytes(8, "big") + b"x" * 10)
    start = time.monotonic()
    with pytest.raises(FrameError, match="stalled"):
        recv_frame(b, max_bytes=1 << 20, deadline=time.monotonic() + 0.3)
    assert time.monotonic() - start < 2
    a.close()
    with pytest.raises(FrameError, match="closed"):
        recv_frame(b, max_bytes=1 << 20)
    assert HEADER_SIZE == 12
