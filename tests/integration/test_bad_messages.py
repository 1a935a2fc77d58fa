"""Tampered, unsigned, forged and garbage messages are dropped with a reason; the receiver lives on."""

from __future__ import annotations

import pytest

from common import codec, topics
from common.envelope import seal
from common.errors import Reason
from common.messages import Request
from tests.conftest import Inbox, bundle, open_messenger, open_transport

pytestmark = pytest.mark.integration


def _tamper(wire: bytes) -> bytes:
    raw = codec.decode(wire)
    raw["body"] = codec.encode({"command": "shutdown", "args": {}, "payload": {}})
    return codec.encode(raw)


def _unsign(wire: bytes) -> bytes:
    raw = codec.decode(wire)
    del raw["sig"]
    return codec.encode(raw)


def _forge_sender(wire: bytes) -> bytes:
    raw = codec.decode(wire)
    raw["sender"] = "admin-1"
    return codec.encode(raw)


def test_bad_envelopes_are_dropped_with_reasons_and_the_receiver_stays_up(federation, clients):
    got = Inbox()
    rejected: list[tuple[str, Reason]] = []
    node = open_messenger(federation, "node-a", clients)
    node.on_reject(lambda topic, exc: rejected.append((topic, exc.reason)))
    node.subscribe(topics.requests("node-a"), got)

    raw = open_transport(federation, "res-1", clients)  # publishes bytes as they are
    topic = topics.requests("node-a")
    _, good = seal(bundle(federation, "res-1"), "request", Request(command="ping"), topic=topic)
    cases = [
        (_tamper(good), Reason.BAD_SIGNATURE),
        (_unsign(good), Reason.UNSIGNED),
        (_forge_sender(good), Reason.BAD_CERT),
        (b"\x00\x01garbage", Reason.NOT_MSGPACK),
        (codec.encode([1, 2, 3]), Reason.BAD_ENVELOPE),
        (b"\xc1", Reason.NOT_MSGPACK),
        (codec.encode({"v": 99, "type": "request"}), Reason.BAD_VERSION),
    ]
    for payload, _ in cases:
        raw.publish(topic, payload)
    _, after = seal(bundle(federation, "res-1"), "request", Request(command="still-alive"), topic=topic)
    raw.publish(topic, after)

    assert got.wait_for(lambda items: any(m.body.command == "still-alive" for m in items))
    assert [m.body.command for m in got.items] == ["still-alive"]
    assert [reason for _, reason in rejected] == [expected for _, expected in cases]


def test_node_cannot_pose_as_a_researcher(federation, clients):
    """A node's own valid signature does not let it send a researcher-only type."""
    rejected = []
    aggregator = open_messenger(federation, "agg-1", clients)
    aggregator.on_reject(lambda topic, exc: rejected.append(exc.reason))
    got = Inbox()
    aggregator.subscribe(topics.update("res-1", "j9", "node-a"), got)
    raw = open_transport(federation, "node-a", clients)
    node_identity = bundle(federation, "node-a")
    from common.identity import Identity
    researcher_claim = Identity(**{**node_identity.__dict__, "role": "researcher"})
    _, wire = seal(researcher_claim, "job", {"job_id": "j9", "owner": "node-a", "plan": {"zoo": "mlp"},
                                             "rounds": 1, "tags": ["x"]}, topic=topics.update("res-1", "j9", "node-a"))
    raw.publish(topics.update("res-1", "j9", "node-a"), wire)
    assert got.wait_for(lambda items: False, timeout_s=1) is False
    assert rejected == [Reason.ROLE_NOT_ALLOWED]
