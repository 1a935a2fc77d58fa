"""Attacks on a running federation (real node and aggregator processes behind the TLS broker).

"mallory" holds an admin certificate, so the broker lets her write anywhere: she plays a
compromised broker that replays and injects. Only the receivers' own checks stand in her way.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import msgpack
import pytest

from common import codec, topics
from common.envelope import PROTOCOL_VERSION, _signed_bytes
from common.identity import Identity
from common.settings import TransportSettings
from common.transport import Transport
from researcher.ask import ask
from researcher.experiment import Experiment

pytestmark = pytest.mark.e2e


def _mallory(fed, on_delivery=None) -> Transport:
    t = Transport(Identity.load(fed.ws.bundle_dir("mallory")), TransportSettings(clean_start=True, session_expiry_s=0),
                  client_id=uuid.uuid4().hex[:6], on_delivery=on_delivery)
    t.connect()
    return t


def test_a_replayed_update_is_never_folded_twice(sites):
    fed = sites
    captured: dict[str, list[bytes]] = {}
    opened = threading.Event()
    alice = Identity.load(fed.ws.bundle_dir("alice"))
    exp = Experiment(alice, plan="mlp", tags=["fmnist"], rounds=3, quorum=2, round_deadline_s=60,
                     model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                     training_args={"epochs": 1, "lr": 0.05, "batch_size": 50}, seed=2)

    def on_delivery(d):
        if "/updates/" in d.topic:
            captured.setdefault(d.topic, []).append(bytes(d.payload))
        elif d.topic.endswith("/events") and b"round_opened" in bytes(d.payload) and len(captured) >= 2:
            opened.set()

    mallory = _mallory(fed, on_delivery)
    mallory.subscribe(f"fbm/v1/jobs/{exp.owner}/{exp.job_id}/updates/+", qos=1)
    mallory.subscribe(topics.events(exp.owner, exp.job_id), qos=1)
    exp.submit()
    assert opened.wait(60), "round 2 never opened"
    for topic, payloads in captured.items():  # round 1's updates, replayed into round 2, twice
        for _ in range(2):
            mallory.publish(topic, payloads[0])
    state = exp.watch(timeout_s=120, progress=False)
    mallory.close()
    exp.close()
    assert state.status == "done", state.reason
    for h in state.history:
        assert sorted(r["node"] for r in h["reports"]) == ["site-1", "site-2"], h
    log = (fed.root / "logs" / "agg-agg-1.log").read_text()
    # same message ids: the messenger drops them; were the dedupe window gone (a restart), the
    # round check would, as the round number is signed
    assert log.count('"duplicate_dropped"') >= 4, log


def _junk(rng: random.Random, signer: Identity) -> bytes:
    """One malformed request of a random kind."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return msgpack.packb([rng.random(), "x" * rng.randrange(10)])
    if kind == 2:
        return msgpack.packb({"v": rng.choice([0, 2, 99]), "type": "request", "body": b"", "sig": b"x"})
    raw = {"v": PROTOCOL_VERSION, "type": rng.choice(["request", "job", "nope", "update"]), "id": uuid.uuid4().hex,
           "ts": time.time(), "sender": signer.name, "job": None, "round": None}
    body = rng.choice([rng.randbytes(30), msgpack.packb({"command": 5}), msgpack.packb({"command": "x" * 500}),
                       msgpack.packb({"params": msgpack.ExtType(1, rng.randbytes(20))})])
    sig = signer.sign(_signed_bytes(raw, body, topics.requests("site-1")))
    if kind == 3:
        sig = bytes(b ^ 1 for b in sig)  # tampered
    return codec.encode({**raw, "body": body, "cert": signer.cert_der, "sig": sig})


def test_a_node_flooded_with_malformed_requests_still_answers(sites):
    fed = sites
    mallory = _mallory(fed)
    alice = Identity.load(fed.ws.bundle_dir("alice"))
    rng = random.Random(7)
    for _ in range(300):
        mallory.publish(topics.requests("site-1"), _junk(rng, alice))
    mallory.close()
    reply = ask(alice, "site-1", "ping", timeout_s=30)
    assert reply.ok and reply.data["pong"] is True
    log = (fed.root / "logs" / "node-site-1.log").read_text()
    assert log.count('"message_dropped"') >= 295, log.count('"message_dropped"')
