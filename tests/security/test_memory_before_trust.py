"""Issue 17, attack 5: memory spent on a message before anyone checked who sent it.

A receiving process (tests/security/memory_receiver.py: a Messenger subscribed like a node,
default settings) is sent, through the real TLS broker, by "admin-1" (the admin role may write
anywhere, so it stands in for a compromised broker or any writer of the topic):

- an envelope whose `body` is ~4 MiB of nested empty maps (each 1 byte on the wire, ~70 bytes
  once decoded): the old parser decoded it whole before looking at the signature;
- one ~1 MiB chunk frame claiming 2048 chunks: the old reassembler allocated (and zeroed) the
  claimed 2 GiB on arrival; also retained, where it hits every subscriber at every connect.

Each receiver's peak resident memory (VmHWM) must stay within BOUND_MIB of its baseline, and a
valid message sent afterwards must still be delivered.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import msgpack
import pytest

from common import chunking, topics
from common.envelope import PROTOCOL_VERSION
from common.messages import Request
from tests.conftest import open_messenger, open_transport
from tests.security.memory_receiver import vm_hwm_kb

pytestmark = pytest.mark.integration

BOUND_MIB = 64
MIB = 1024 * 1024


class Receiver:
    """The receiving subprocess and the lines it printed."""

    def __init__(self, bundle_dir: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.security.memory_receiver", bundle_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        assert self.wait_for("ready", 60), f"receiver did not start: {self.lines}"
        self.base_kb = int(next(line for line in self.lines if line.startswith("base "))[5:])

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.strip())

    def wait_for(self, line: str, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if line in self.lines:
                return True
            time.sleep(0.05)
        return line in self.lines

    def growth_mib(self) -> float:
        return (vm_hwm_kb(str(self.proc.pid)) - self.base_kb) / 1024

    def stop(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def receiver(own_federation) -> Iterator[Receiver]:
    """A receiver on a broker of its own: the attack traffic and any retained message other
    tests left on the shared broker stay out of each other's way."""
    r = Receiver(str(own_federation.ws.bundle_dir("node-a")))
    yield r
    r.stop()


def nested_envelope(nbytes: int) -> bytes:
    """An envelope-shaped map whose body is an array of `nbytes` empty maps (no signature needed)."""
    header = {"v": PROTOCOL_VERSION, "type": "request", "id": uuid.uuid4().hex, "ts": time.time(),
              "sender": "res-1", "job": None, "round": None}
    head = msgpack.packb(header)[1:]  # the map's entries, without its own header
    return (bytes([0x80 | (len(header) + 3)]) + head + msgpack.packb("body") + b"\xdd" + struct.pack(">I", nbytes)
            + b"\x80" * nbytes + msgpack.packb("cert") + msgpack.packb(b"x") + msgpack.packb("sig") + msgpack.packb(b"x"))


def greedy_chunk(count: int = 2048) -> bytes:
    """Chunk 0 of `count`, just under 1 MiB in all (so it travels as one MQTT message)."""
    head = struct.pack("<4s16sII", chunking.CHUNK_TAG, uuid.uuid4().bytes, 0, count)
    return head + os.urandom(MIB - 64 - len(head))


def _still_serves(fed, clients, receiver: Receiver) -> None:
    researcher = open_messenger(fed, "res-1", clients)
    before = sum(1 for x in receiver.lines if x == "got request")
    researcher.send(topics.requests("node-a"), "request", Request(command="ping"))
    assert _wait_count(receiver, "got request", before + 1), f"a valid request was not delivered: {receiver.lines}"


def _wait_count(receiver: Receiver, line: str, n: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(1 for x in receiver.lines if x.startswith(line)) >= n:
            return True
        time.sleep(0.05)
    return False


def test_a_nested_body_is_not_decoded_before_the_signature_is_checked(own_federation, clients, receiver):
    fed = own_federation
    wire = nested_envelope(4 * MIB)
    admin = open_transport(fed, "admin-1", clients)
    admin.publish(topics.requests("node-a"), wire)
    assert _wait_count(receiver, "dropped", 1, 60), f"the message was not dropped: {receiver.lines}"
    _still_serves(fed, clients, receiver)
    growth = receiver.growth_mib()
    print(f"receiver peak growth: {growth:.1f} MiB")
    assert growth < BOUND_MIB, f"a {len(wire) / MIB:.1f} MiB message raised the receiver's peak by {growth:.0f} MiB"


def test_a_chunk_claiming_2048_chunks_costs_what_arrived_not_what_it_claims(own_federation, clients, receiver):
    fed = own_federation
    admin = open_transport(fed, "admin-1", clients)
    for _ in range(3):  # three transfers on the same topic: the per-topic budget holds them, or drops
        admin.publish(topics.requests("node-a"), greedy_chunk())
    _still_serves(fed, clients, receiver)
    growth = receiver.growth_mib()
    print(f"receiver peak growth: {growth:.1f} MiB")
    assert growth < BOUND_MIB, f"three 1 MiB frames raised the receiver's peak by {growth:.0f} MiB"


def test_a_retained_greedy_chunk_costs_nothing_at_connect(own_federation, clients):
    fed = own_federation
    admin = open_transport(fed, "admin-1", clients)
    topic = topics.chunk(topics.job("res-1", "greedy-job"), 0)
    admin.publish(topic, greedy_chunk(), retain=True)
    try:
        for _ in range(2):  # every (re)connecting subscriber gets it
            r = Receiver(str(fed.ws.bundle_dir("node-a")))
            try:
                _still_serves(fed, clients, r)
                growth = r.growth_mib()
                print(f"new subscriber peak growth: {growth:.1f} MiB")
                assert growth < BOUND_MIB, f"a retained 1 MiB frame raised a new subscriber's peak by {growth:.0f} MiB"
            finally:
                r.stop()
    finally:
        admin.publish(topic, b"", retain=True)
