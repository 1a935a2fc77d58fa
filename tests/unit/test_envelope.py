"""Sealing and opening envelopes: every way a message can be bad has its own reason."""

from __future__ import annotations

import pytest
import torch

from broker import pki
from broker.workspace import Workspace
from common import codec
from common.envelope import _signed_bytes, open_envelope, seal
from common.errors import BadMessage, Reason
from common.identity import Identity, TrustStore
from common.messages import Request, Update


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("fed"))
    ws.init("unit", port=1)
    ids = {name: Identity.load(ws.enroll(name, role)) for name, role in
           [("node-a", "node"), ("res-1", "researcher"), ("agg-1", "aggregator")]}
    other = Workspace(tmp_path_factory.mktemp("other"))
    other.init("other", port=1)
    ids["rogue"] = Identity.load(other.enroll("res-1", "researcher"))
    return ids, TrustStore(ids["node-a"].ca_pem)


def _reason(data, trust, topic=""):
    with pytest.raises(BadMessage) as err:
        open_envelope(data, trust, topic)
    return err.value.reason


def test_round_trip_with_tensors(fed):
    ids, trust = fed
    params = {"w": torch.randn(4, 3), "b": torch.zeros(3)}
    msg_id, wire = seal(ids["node-a"], "update", Update(round=2, params=params, n_samples=7), job="j", round_=2)
    msg = open_envelope(wire, trust)
    assert msg.id == msg_id and msg.sender == "node-a" and msg.role == "node" and msg.job == "j"
    assert msg.round == 2 and msg.body.n_samples == 7 and torch.equal(msg.body.params["w"], params["w"])


def _mutate(wire: bytes, **changes) -> bytes:
    raw = codec.decode(wire)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return codec.encode(raw)


def _resign(identity, wire: bytes, body: bytes) -> bytes:
    """A correctly signed envelope around a body that breaks its schema."""
    raw = codec.decode(wire)
    raw["body"] = body
    raw["sig"] = identity.sign(_signed_bytes(raw, body))
    return codec.encode(raw)


def test_each_kind_of_bad_envelope_has_its_reason(fed):
    ids, trust = fed
    _, wire = seal(ids["res-1"], "request", Request(command="ping"))
    _, rogue = seal(ids["rogue"], "request", Request(command="ping"))
    _, node_wire = seal(ids["node-a"], "reply", {"command": "ping"})
    cases = {
        Reason.NOT_MSGPACK: b"\xc1",
        Reason.BAD_ENVELOPE: codec.encode("hello"),
        Reason.BAD_VERSION: _mutate(wire, v=1),  # version 1 did not sign the topic
        Reason.UNKNOWN_TYPE: _mutate(wire, type="launch_missiles"),
        Reason.UNSIGNED: _mutate(wire, sig=None),
        Reason.BAD_SIGNATURE: _mutate(wire, round=5),
        Reason.BAD_CERT: rogue,
        Reason.BAD_BODY: _resign(ids["res-1"], wire, codec.encode({"command": ""})),
    }
    for reason, data in cases.items():
        assert _reason(data, trust) == reason, reason
    # the body is covered by the signature: a valid-looking substitute body fails the signature
    assert _reason(_mutate(wire, body=codec.encode({"command": "other"})), trust) == Reason.BAD_SIGNATURE
    # a researcher's cert cannot carry another identity's name
    assert _reason(_mutate(wire, sender="node-a"), trust) == Reason.BAD_CERT
    assert open_envelope(node_wire, trust).type == "reply"


def test_roles_are_enforced_on_both_sides(fed):
    ids, trust = fed
    with pytest.raises(PermissionError):
        seal(ids["node-a"], "job", {"job_id": "x", "owner": "n", "plan": {"zoo": "mlp"}, "rounds": 1, "tags": ["t"]})
    forged = Identity(**{**ids["node-a"].__dict__, "role": "researcher"})
    _, wire = seal(forged, "job", {"job_id": "x", "owner": "n", "plan": {"zoo": "mlp"}, "rounds": 1, "tags": ["t"]})
    assert _reason(wire, trust) == Reason.ROLE_NOT_ALLOWED


def test_expired_certificate_is_refused(fed, monkeypatch):
    ids, _ = fed
    trust = TrustStore(ids["node-a"].ca_pem)
    _, wire = seal(ids["res-1"], "request", Request(command="ping"))
    open_envelope(wire, trust)
    import datetime as dt

    real = dt.datetime
    class Later(real):
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + dt.timedelta(days=pki.LEAF_DAYS + 1)
    monkeypatch.setattr("common.identity.dt.datetime", Later)
    assert _reason(wire, trust) == Reason.BAD_CERT


@pytest.mark.parametrize("n", [0, 10, 300, 70_000, 3_000_000])
def test_the_streamed_envelope_is_byte_for_byte_the_map_it_always_was(fed, n):
    """seal_parts writes the map in pieces (body first, signature last, to hash while sending);
    receivers must see exactly `codec.encode({**header, body, cert, sig})`."""
    from common.envelope import seal_parts

    ids, trust = fed
    sealed = seal_parts(ids["node-a"], "update", Update(round=1, params={"w": torch.randn(n // 4 + 1)}, n_samples=1),
                        job="j", round_=1)
    wire = b"".join(sealed.parts)
    assert len(wire) == sealed.size
    raw = codec.decode(wire)
    assert wire == codec.encode({k: raw[k] for k in ("v", "type", "id", "ts", "sender", "job", "round", "body", "cert", "sig")})
    assert open_envelope(wire, trust).id == sealed.msg_id


def test_the_body_hash_made_during_reassembly_is_used_only_for_exactly_the_body(fed):
    from common.chunking import Reassembler, split
    from common.envelope import body_span

    ids, trust = fed
    _, wire = seal(ids["node-a"], "update", Update(round=1, params={"w": torch.randn(700_000)}, n_samples=1))
    frames, manifest = split(wire, 1 << 20)
    r = Reassembler(span_of=body_span)
    for frame in frames:
        r.add_chunk("t", frame)
    whole = r.add_manifest("t", manifest)
    raw = codec.decode(wire)
    import hashlib

    assert whole.span_sha256 == hashlib.sha256(raw["body"]).digest()
    assert open_envelope(whole, trust).sender == "node-a"
    whole.span_sha256 = bytes(32)  # the precomputed digest is what gets verified...
    assert _reason(whole, trust) == Reason.BAD_SIGNATURE
    whole.span = (whole.span[0] + 1, whole.span[1] + 1)  # ...and only when it covers exactly the body
    assert open_envelope(whole, trust).sender == "node-a"


def test_nothing_nested_is_decoded_before_the_signature_is_checked(fed, monkeypatch):
    """Only the flat header map is read before the signature: a nested value anywhere is refused
    unbuilt, and a forged body never reaches the decoder."""
    import msgpack

    from common import envelope

    ids, trust = fed
    _, wire = seal(ids["res-1"], "request", Request(command="ping"))
    raw = codec.decode(wire)
    nested_body = msgpack.packb({**raw, "body": [{}] * 1000})
    nested_extra = msgpack.packb({**raw, "x": [[[]]]})
    forged = _mutate(wire, body=msgpack.packb({"command": [{}] * 1000}))  # bytes, but not what was signed
    decoded: list = []
    monkeypatch.setattr(envelope.codec, "decode", lambda data: decoded.append(data) or {})
    assert [_reason(d, trust) for d in (nested_body, nested_extra, forged)] == [
        Reason.BAD_ENVELOPE, Reason.BAD_ENVELOPE, Reason.BAD_SIGNATURE]
    assert decoded == []
