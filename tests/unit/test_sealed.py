"""End-to-end sealing (common/sealed.py) and sealed envelopes: who can open what."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.workspace import Workspace
from common import codec, sealed
from common.envelope import SealTo, _signed_bytes, open_envelope, seal
from common.errors import BadMessage, Reason
from common.identity import Identity, TrustStore
from common.messages import Update
from common.sealed import ContentKeys, Keyring, SealError


def _ring(name: str) -> Keyring:
    return Keyring.of(name, ed25519.Ed25519PrivateKey.generate())


def test_the_encryption_key_is_derived_from_the_identity_key_the_same_every_time():
    key = ed25519.Ed25519PrivateKey.generate()
    assert Keyring.of("n1", key).public == Keyring.of("n1", key).public
    assert Keyring.of("n1", key).public != Keyring.of("n2", key).public  # bound to the name too
    assert Keyring.of("n1", key).public != _ring("n1").public


def test_only_the_recipients_open_a_sealed_body_and_get_the_exact_bytes():
    a, b, c = _ring("a"), _ring("b"), _ring("c")
    ck = ContentKeys().for_recipients("jobs/j/model", {"a": a.public, "b": b.public})
    clear = bytes(range(256)) * 1000
    body = sealed.seal_body(ck, ["a", "b"], b"aad", clear)
    assert sealed.is_sealed(body) and clear[:64] not in body
    assert sealed.recipients(body) == ["a", "b"]
    assert bytes(sealed.open_body(a, b"aad", body)) == clear
    assert bytes(sealed.open_body(b, b"aad", body)) == clear
    with pytest.raises(SealError) as err:
        sealed.open_body(c, b"aad", body)
    assert err.value.reason == "not_a_recipient"


def test_a_changed_aad_header_or_ciphertext_does_not_decrypt():
    a = _ring("a")
    ck = ContentKeys().for_recipients("s", {"a": a.public})
    body = sealed.seal_body(ck, ["a"], b"aad", b"secret" * 100)
    for bad_aad, bad_body in [(b"other", body), (b"aad", body[:-40] + bytes([body[-40] ^ 1]) + body[-39:]),
                              (b"aad", body[:8] + bytes([body[8] ^ 1]) + body[9:]), (b"aad", body[:10])]:
        with pytest.raises(SealError) as err:
            sealed.open_body(a, bad_aad, bad_body)
        assert err.value.reason == "bad_seal"


def test_a_late_recipient_gets_the_same_content_key_a_removed_one_a_new_key():
    a, b = _ring("a"), _ring("b")
    keys = ContentKeys()
    first = keys.for_recipients("s", {"a": a.public})
    grown = keys.for_recipients("s", {"a": a.public, "b": b.public})
    assert grown is first and set(grown.recipients) == {"a", "b"}  # the late-joining node is given the key
    shrunk = keys.for_recipients("s", {"b": b.public})
    assert shrunk.key != first.key and set(shrunk.recipients) == {"b"}  # a's wrap would still open it
    body = sealed.seal_body(shrunk, ["b"], b"", b"x" * 10)
    with pytest.raises(SealError):
        sealed.open_body(a, b"", body)


def test_a_body_carries_the_wraps_of_the_names_it_is_sealed_to_and_the_others_get_the_key_apart():
    """A model for 10,000 nodes carried 10,000 wraps (~60 bytes each) to every one of them: O(N^2)
    bytes a round. Wraps are made only for the names a body carries; the others open it with
    the content key given to them on their own (`job_key`), and none of it opens for an outsider."""
    owner, node, outsider = _ring("owner"), _ring("node"), _ring("outsider")
    ck = ContentKeys().for_recipients("jobs/o/j/model", {"owner": owner.public, "node": node.public})
    body = sealed.seal_body(ck, ["owner"], b"aad", b"model" * 50)
    assert sealed.recipients(body) == ["owner"] and set(ck.wraps) == {"owner"}  # no key agreement for "node"
    assert bytes(sealed.open_body(owner, b"aad", body)) == b"model" * 50
    assert bytes(sealed.open_with_key(ck.key, b"aad", body)) == b"model" * 50  # the key "node" was given
    for ring in (node, outsider):
        with pytest.raises(SealError) as err:
            sealed.open_body(ring, b"aad", body)
        assert err.value.reason == "not_a_recipient"


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("fed"))
    ws.init("unit", port=1)
    ids = {name: Identity.load(ws.enroll(name, role)) for name, role in
           [("node-a", "node"), ("node-b", "node"), ("agg-1", "aggregator"), ("agg-2", "aggregator")]}
    rings = {name: Keyring.of(name, ident.key) for name, ident in ids.items()}
    return ids, rings, TrustStore(ids["node-a"].ca_pem)


def _sealed_update(ids, rings, to=("agg-1",)):
    params = {"w": torch.randn(64, 32)}
    ck = ContentKeys().for_recipients("t", {n: rings[n].public for n in to})
    _, wire = seal(ids["node-a"], "update", Update(round=1, params=params, n_samples=3), job="j", round_=1,
                   seal_to=SealTo(ck, tuple(to)))
    return params, wire


def test_a_sealed_update_is_signed_by_its_sender_and_opened_bit_identical_by_its_aggregator(fed):
    ids, rings, trust = fed
    params, wire = _sealed_update(ids, rings)
    assert params["w"].numpy().tobytes() not in wire
    msg = open_envelope(wire, trust, keyring=rings["agg-1"])
    assert msg.sealed and msg.sender == "node-a"
    assert msg.body.params["w"].numpy().tobytes() == params["w"].numpy().tobytes()
    for keyring, reason in [(rings["agg-2"], Reason.NOT_A_RECIPIENT), (None, Reason.NOT_A_RECIPIENT)]:
        with pytest.raises(BadMessage) as err:
            open_envelope(wire, trust, keyring=keyring)
        assert err.value.reason == reason


def test_a_sealed_body_re_signed_by_another_identity_does_not_decrypt(fed):
    """Encrypt-then-sign's known weakness: strip the signature, sign the ciphertext as yourself.
    The sender is in the AAD, so the aggregator cannot be fooled about whose update it is."""
    ids, rings, trust = fed
    _, wire = _sealed_update(ids, rings)
    raw = codec.decode(wire)
    raw["sender"], raw["cert"] = "node-b", ids["node-b"].cert_der
    raw["sig"] = ids["node-b"].sign(_signed_bytes(raw, raw["body"]))
    with pytest.raises(BadMessage) as err:
        open_envelope(codec.encode(raw), trust, keyring=rings["agg-1"])
    assert err.value.reason == Reason.BAD_SEAL


def test_a_clear_message_still_opens_with_a_keyring(fed):
    ids, rings, trust = fed
    _, wire = seal(ids["node-a"], "update", Update(round=1, params={"w": torch.ones(2)}, n_samples=1))
    msg = open_envelope(wire, trust, keyring=rings["agg-1"])
    assert not msg.sealed and msg.body.n_samples == 1


def test_a_jobs_models_are_for_its_listed_nodes_else_the_nodes_holding_its_tags():
    from aggregators.service import participants
    from common.messages import DatasetInfo, JobSpec, NodeStatus, PlanRef

    def status(*tags):
        return NodeStatus(state="online", datasets=[DatasetInfo(name="d", tags=list(tags), type="npz", n_samples=5)])

    declared = {"n1": status("a", "b"), "n2": status("a"), "n3": status("c")}
    spec = JobSpec(job_id="j", owner="alice", plan=PlanRef(zoo="mlp"), rounds=1, tags=["a"])
    assert participants(spec, declared) == ["n1", "n2"]
    listed = spec.model_copy(update={"nodes": ["n2", "n3"]})
    assert participants(listed, declared) == ["n2", "n3"]  # n1 holds the tags but is not in the job


def test_a_recipient_hands_the_content_key_to_a_late_one_who_then_opens_the_signed_original(fed):
    """A job sealed before node-b joined: the aggregator (a recipient) gives node-b the job's
    content key; node-b opens the owner's signed message with it, and only with the right key."""
    from common.envelope import sealed_content_key, sealed_recipients

    ids, rings, trust = fed
    params, wire = _sealed_update(ids, rings, to=("agg-1",))
    assert sealed_recipients(wire) == ["agg-1"]
    key = sealed_content_key(wire, rings["agg-1"])
    msg = open_envelope(wire, trust, content_key=key)
    assert msg.sealed and msg.body.params["w"].numpy().tobytes() == params["w"].numpy().tobytes()
    with pytest.raises(BadMessage) as err:
        open_envelope(wire, trust, content_key=bytes(32))
    assert err.value.reason == Reason.BAD_SEAL
    with pytest.raises(BadMessage):
        sealed_content_key(wire, rings["node-b"])


def test_a_wrap_opened_once_is_not_opened_again_and_a_changed_one_is_refused():
    """An aggregator opens N updates a round, each sealed with the content key its node keeps
    for the stream: the key agreement is done once per (stream, ephemeral key, wrap), not per
    update. A changed wrap is not taken from the memory: it is opened (and refused) anew."""
    a = _ring("a")
    ck = ContentKeys().for_recipients("s", {"a": a.public})
    bodies = [sealed.seal_body(ck, ["a"], b"aad", b"round %d" % r) for r in range(3)]
    assert bytes(sealed.open_body(a, b"aad", bodies[0])) == b"round 0"
    assert len(a.unwrapped) == 1
    for r, body in enumerate(bodies):
        assert bytes(sealed.open_body(a, b"aad", body)) == b"round %d" % r
    assert len(a.unwrapped) == 1
    forged = ContentKeys().for_recipients("s", {"a": a.public})  # another key, same stream
    tampered = bytearray(sealed.seal_body(forged, ["a"], b"aad", b"x"))
    header = sealed._parse(memoryview(tampered))[0]
    start = bytes(tampered).index(header["w"]["a"])
    tampered[start] ^= 1
    with pytest.raises(SealError) as err:
        sealed.open_body(a, b"aad", bytes(tampered))
    assert err.value.reason == "bad_seal" and len(a.unwrapped) == 1


def test_the_least_recently_used_stream_is_forgotten_not_the_first_made():
    """Red before: first in first out at 4,096 streams, an aggregator that gave 10,000 nodes the
    model's key (a sealed job_key each: one stream each) had forgotten the model's stream by the
    time it sealed the model, which then went out under a key no node had (round 1 hung)."""
    a = _ring("a")
    keys = ContentKeys(max_streams=2)
    model = keys.for_recipients("model", {"a": a.public})
    keys.for_recipients("requests/1", {"a": a.public})
    assert keys.for_recipients("model", {"a": a.public}) is model  # used again: most recent
    keys.for_recipients("requests/2", {"a": a.public})  # "requests/1" goes
    assert keys.for_recipients("model", {"a": a.public}) is model
    assert keys.key_of("requests/1") is None
