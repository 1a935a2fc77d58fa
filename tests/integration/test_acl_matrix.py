"""The role ACL, checked on the wire: every role x every channel of common/protocol.py (docs/design.md).

The expectations are written out here from the DESIGN table, independently of broker/acl.py.
Publishes are checked by their PUBACK (MQTT 5 reason 135 when refused) and by whether an admin
subscriber receives them; subscriptions by whether anything is delivered (Mosquitto grants
every SUBSCRIBE and filters at delivery). A barrier message published last on a topic each
client may read proves that whatever had not arrived by then never will.
"""

from __future__ import annotations

import pytest

from common import topics
from common.errors import PublishDenied
from tests.conftest import Inbox, open_transport

pytestmark = pytest.mark.integration

JOB = "j1"
TOPICS = {
    "job": topics.job("res-1", JOB),
    "job of res-2": topics.job("res-2", JOB),
    "model": topics.model("res-1", JOB),
    "history": topics.history("res-1", JOB),
    "update/node-a": topics.update("res-1", JOB, "node-a"),
    "update/node-b": topics.update("res-1", JOB, "node-b"),
    "events": topics.events("res-1", JOB),
    "status/node-a": topics.status("node-a"),
    "status/node-b": topics.status("node-b"),
    "requests/node-a": topics.requests("node-a"),
    "requests/node-b": topics.requests("node-b"),
    "replies/node-a": topics.replies("node-a", "res-1"),
    "replies/node-b": topics.replies("node-b", "res-1"),
    "replies/node-a to res-2": topics.replies("node-a", "res-2"),
    # the aggregator fleet (issue 23): agg-x is another aggregator identity
    "claim/agg-1": topics.claim("res-1", JOB, "agg-1"),
    "claim/agg-x": topics.claim("res-1", JOB, "agg-x"),
    "checkpoint/agg-1": topics.checkpoint("res-1", JOB, "agg-1"),
    "checkpoint/agg-x": topics.checkpoint("res-1", JOB, "agg-x"),
    "agg_status/agg-1": topics.agg_status("agg-1"),
    "agg_status/agg-x": topics.agg_status("agg-x"),
    "keys/node-a": topics.keys("node-a"),
}
CLIENTS = ["node-a", "node-b", "res-1", "res-2", "agg-1", "admin-1"]

# Who may publish to each topic (admin may do everything): a researcher only under its own name.
WRITERS = {
    "job": {"res-1"},
    "job of res-2": {"res-2"},
    "model": {"agg-1"},
    "history": {"agg-1"},
    "update/node-a": {"node-a"},
    "update/node-b": {"node-b"},
    "events": {"agg-1"},
    "status/node-a": {"node-a"},
    "status/node-b": {"node-b"},
    "requests/node-a": {"res-1", "res-2", "agg-1"},
    "requests/node-b": {"res-1", "res-2", "agg-1"},
    "replies/node-a": {"node-a"},
    "replies/node-b": {"node-b"},
    "replies/node-a to res-2": {"node-a"},
    "claim/agg-1": {"agg-1"},
    "claim/agg-x": set(),
    "checkpoint/agg-1": {"agg-1"},
    "checkpoint/agg-x": set(),
    "agg_status/agg-1": {"agg-1"},
    "agg_status/agg-x": set(),
    "keys/node-a": {"node-a"},
}
# Who receives what is published on each topic: a researcher only its own jobs' and the replies
# addressed to it (issue 18); nodes no jobs' events.
READERS = {
    "job": {"node-a", "node-b", "agg-1", "res-1"},
    "job of res-2": {"node-a", "node-b", "agg-1", "res-2"},
    "model": {"node-a", "node-b", "res-1"},
    "history": {"res-1"},
    "update/node-a": {"agg-1"},
    "update/node-b": {"agg-1"},
    "events": {"res-1"},
    "status/node-a": {"res-1", "res-2", "agg-1"},
    "status/node-b": {"res-1", "res-2", "agg-1"},
    "requests/node-a": {"node-a"},
    "requests/node-b": {"node-b"},
    "replies/node-a": {"res-1", "agg-1"},
    "replies/node-b": {"res-1", "agg-1"},
    "replies/node-a to res-2": {"res-2", "agg-1"},
    "claim/agg-1": {"node-a", "node-b", "res-1", "agg-1"},  # res-1 owns the job
    "claim/agg-x": {"node-a", "node-b", "res-1", "agg-1"},
    "checkpoint/agg-1": {"agg-1"},  # a job's state: aggregators only
    "checkpoint/agg-x": {"agg-1"},
    "agg_status/agg-1": {"res-1", "res-2", "agg-1"},
    "agg_status/agg-x": {"res-1", "res-2", "agg-1"},
    "keys/node-a": {"node-a", "node-b", "res-1", "res-2", "agg-1"},
}
# A topic each client can read, used as its barrier.
BARRIER = {
    "node-a": "requests/node-a",
    "node-b": "requests/node-b",
    "res-1": "replies/node-a",
    "res-2": "replies/node-a to res-2",
    "agg-1": "update/node-a",
    "admin-1": "job",
}


def _texts(inbox: Inbox) -> set[str]:
    """The test's own (text) payloads: other tests' Messengers leave their encryption keys
    retained on `keys/{name}` (binary), which a subscriber to those topics also gets."""
    return {p.decode() for p in inbox.payloads() if p.startswith((b"pub|", b"sub|", b"wild|", b"barrier"))}


def test_publish_matrix(federation, clients):
    admin_inbox = Inbox()
    admin = open_transport(federation, "admin-1", clients, admin_inbox)
    admin.subscribe("fbm/v1/#")
    publishers = {name: open_transport(federation, name, clients) for name in CLIENTS if name != "admin-1"}
    publishers["admin-1"] = admin

    outcome: dict[tuple[str, str], int] = {}
    for name, transport in publishers.items():
        for key, topic in TOPICS.items():
            try:
                transport.publish(topic, f"pub|{name}|{key}".encode())
                outcome[(name, key)] = 0
            except PublishDenied as exc:
                outcome[(name, key)] = exc.reason_code
    admin.publish(TOPICS["job"], b"barrier")
    assert admin_inbox.wait_for(lambda items: any(i.payload == b"barrier" for i in items))

    delivered = _texts(admin_inbox)
    failures = []
    for name in publishers:
        for key in TOPICS:
            allowed = name == "admin-1" or name in WRITERS[key]
            expected_code = 0 if allowed else 135
            if outcome[(name, key)] != expected_code:
                failures.append(f"{name} -> {key}: PUBACK {outcome[(name, key)]}, expected {expected_code}")
            if (f"pub|{name}|{key}" in delivered) != allowed:
                failures.append(f"{name} -> {key}: delivered={not allowed}, expected {allowed}")
    assert not failures, "\n".join(failures)


def test_subscribe_matrix(federation, clients):
    inboxes = {name: Inbox() for name in CLIENTS}
    subscribers = {}
    for name in CLIENTS:
        transport = open_transport(federation, name, clients, inboxes[name])
        for topic in TOPICS.values():
            transport.subscribe(topic)
        subscribers[name] = transport
    admin = subscribers["admin-1"]
    for key, topic in TOPICS.items():
        admin.publish(topic, f"sub|{key}".encode())
    for name, key in BARRIER.items():
        admin.publish(TOPICS[key], f"barrier|{name}".encode())
    for name in CLIENTS:
        assert inboxes[name].wait_for(
            lambda items, n=name: any(i.payload == f"barrier|{n}".encode() for i in items)
        ), f"{name} never got its barrier"

    failures = []
    for name in CLIENTS:
        got = _texts(inboxes[name])
        for key in TOPICS:
            allowed = name == "admin-1" or name in READERS[key]
            if (f"sub|{key}" in got) != allowed:
                failures.append(f"{name} reading {key}: delivered={not allowed}, expected {allowed}")
    assert not failures, "\n".join(failures)


def test_wildcard_subscription_leaks_nothing(federation, clients):
    """A node subscribing to '#' still sees only what its role may read."""
    inbox = Inbox()
    node = open_transport(federation, "node-a", clients, inbox)
    node.subscribe("#")
    admin = open_transport(federation, "admin-1", clients)
    for key, topic in TOPICS.items():
        admin.publish(topic, f"wild|{key}".encode())
    admin.publish(TOPICS["requests/node-a"], b"barrier")
    assert inbox.wait_for(lambda items: any(i.payload == b"barrier" for i in items))
    got = _texts(inbox)
    expected = {f"wild|{k}" for k, readers in READERS.items() if "node-a" in readers}
    assert got - {"barrier"} == expected
