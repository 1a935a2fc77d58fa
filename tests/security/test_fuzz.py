"""Malformed input thrown at every receiving component: zero crashes, a reason for each.

Each component must turn whatever it is given into either a valid result or a `BadMessage`
with a reason (an aggregator update check: a reason string), never another exception, and
must still accept a valid message afterwards. Bodies are fuzzed inside *validly signed*
envelopes too, so the fuzz reaches the decoder and the schemas, not just the signature check.
"""

from __future__ import annotations

import struct
import time
import uuid

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import pki
from common import chunking, codec
from common.envelope import PROTOCOL_VERSION, _signed_bytes, open_envelope, seal
from common.errors import BadMessage, Reason
from common.identity import Identity, TrustStore
from common.messages import registered_types

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A CA and one identity per role, on disk like `fbm-broker enroll` writes them."""
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca("fuzz")
    identities = {}
    for name, role in [("node-a", "node"), ("res-1", "researcher"), ("agg-1", "aggregator")]:
        pair = pki.create_identity_cert(ca, name, role)
        d = root / name
        d.mkdir()
        (d / "ca.crt").write_bytes(ca.cert_pem)
        (d / "identity.crt").write_bytes(pair.cert_pem)
        (d / "identity.key").write_bytes(pair.key_pem)
        (d / "bundle.json").write_text(f'{{"name": "{name}", "role": "{role}"}}')
        identities[role] = Identity.load(d)
    return _World((identities, TrustStore(ca.cert_pem)))


class _World(tuple):
    def __repr__(self) -> str:  # keep hypothesis' failure reports readable
        return "<world: 3 identities + trust store>"


def _sign_raw(identity: Identity, type_: object, body: bytes, **header) -> bytes:
    """A correctly signed envelope around arbitrary body bytes (what a buggy or hostile peer sends)."""
    raw = {"v": PROTOCOL_VERSION, "type": type_, "id": uuid.uuid4().hex, "ts": time.time(), "sender": identity.name,
           "job": None, "round": None, **header}
    try:
        sig = identity.sign(_signed_bytes(raw, body, "fbm/v1/nodes/node-a/requests"))
    except Exception:  # noqa: BLE001 - a header the signer cannot even serialise: send it unsigned
        sig = b"x"
    return codec.encode({**raw, "body": body, "cert": identity.cert_der, "sig": sig})


def _still_serves(world) -> None:
    identities, trust = world
    _, wire = seal(identities["researcher"], "request", {"command": "ping"})
    assert open_envelope(wire, trust).body.command == "ping"


def _rejects_or_opens(data, trust) -> Reason | None:
    try:
        open_envelope(data, trust, topic="fbm/v1/nodes/node-a/requests")
    except BadMessage as exc:
        assert exc.reason in set(Reason) and exc.detail
        return exc.reason
    return None


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-(2**63), 2**63 - 1), children, max_size=5),
    max_leaves=20,
)

ENVELOPE_KEYS = ["v", "type", "id", "ts", "sender", "job", "round", "body", "cert", "sig"]


@FUZZ
@given(st.binary(max_size=300))
def test_garbage_bytes(world, data):
    _rejects_or_opens(data, world[1])


@FUZZ
@given(msgpack_values)
def test_wrong_msgpack_shapes(world, value):
    assert _rejects_or_opens(msgpack.packb(value, use_bin_type=True), world[1]) is not None


@FUZZ
@given(st.dictionaries(st.sampled_from(ENVELOPE_KEYS), msgpack_values, max_size=10))
def test_envelope_fields_of_wrong_types(world, fields):
    assert _rejects_or_opens(msgpack.packb(fields, use_bin_type=True), world[1]) is not None


@FUZZ
@given(st.sampled_from(["node", "researcher", "aggregator"]),
       st.one_of(st.sampled_from(sorted(registered_types())), st.text(max_size=12), st.integers(-1000, 1000), st.none()),
       st.one_of(st.binary(max_size=200), msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True))),
       st.one_of(st.just(PROTOCOL_VERSION), st.integers(-5, 5)))
def test_signed_envelopes_with_malformed_bodies_types_and_versions(world, role, type_, body, version):
    identities, trust = world
    reason = _rejects_or_opens(_sign_raw(identities[role], type_, body, v=version), trust)
    if version != PROTOCOL_VERSION or type_ not in registered_types():
        assert reason is not None


def _tensor_ext(kind: int, code: int, shape: list[int], data: bytes) -> msgpack.ExtType:
    head = struct.pack("<BBB", kind, code, len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
    pad = (-len(head)) % 16
    return msgpack.ExtType(codec.TENSOR_EXT, head + b"\0" * pad + data)


@FUZZ
@given(st.integers(0, 3), st.integers(0, 20), st.lists(st.integers(0, 2**40), max_size=4), st.binary(max_size=64),
       st.binary(max_size=40))
def test_tensors_with_huge_or_lying_headers(world, kind, code, shape, data, junk):
    """Declared shapes up to 2**40 per dimension, truncated data, unknown dtypes, pure junk."""
    identities, trust = world
    for ext in (_tensor_ext(kind, code, shape, data), msgpack.ExtType(codec.TENSOR_EXT, junk), msgpack.ExtType(7, junk)):
        body = msgpack.packb({"round": 1, "n_samples": 3, "params": {"w": ext}}, use_bin_type=True)
        _rejects_or_opens(_sign_raw(identities["node"], "update", body, round=1), trust)
    _still_serves(world)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["chunk", "manifest", "truncated", "junk"]), st.binary(max_size=64),
                          st.integers(0, 2**64 - 1), st.integers(0, 5), st.integers(0, 5)), max_size=12))
def test_reassembler_with_truncated_lying_and_junk_frames(frames):
    """Manifests that declare 2**64-byte payloads, chunk counts that disagree, truncated frames."""
    r = chunking.Reassembler(max_bytes=1 << 20)
    transfer = uuid.UUID(int=1).bytes
    for kind, data, size, index, count in frames:
        try:
            if kind == "chunk":
                r.add_chunk("s", struct.pack("<4s16sII", chunking.CHUNK_TAG, transfer, index, count) + data)
            elif kind == "manifest":
                payload = chunking.MANIFEST_TAG + codec.encode({"t": transfer, "n": count, "size": size, "sha256": data[:32]})
                r.add_manifest("s", payload)
            elif kind == "truncated":
                r.add_chunk("s", chunking.CHUNK_TAG + data[:10])
            else:
                r.add_manifest("s", chunking.MANIFEST_TAG + data)
        except BadMessage as exc:
            assert exc.reason in (Reason.BAD_CHUNK, Reason.CHECKSUM_MISMATCH, Reason.NOT_MSGPACK, Reason.TOO_LARGE)
    assert r.pending_bytes <= (1 << 20) + 64
    payload = bytes(range(256)) * 10  # and a good transfer still goes through
    chunks, manifest = chunking.split(payload, 1000)
    for c in chunks:
        r.add_chunk("good", c)
    assert bytes(r.add_manifest("good", manifest)) == payload


dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.int8, torch.bool])


@FUZZ
@given(dtypes, st.lists(st.integers(0, 4), min_size=0, max_size=3), st.sampled_from(["ok", "nan", "inf", "-inf"]),
       st.booleans(), st.integers(-(2**40), 2**40))
def test_aggregator_update_checks(dtype, shape, poison, rename, n_samples):
    """Wrong shapes, dtypes, names, NaN/Inf and sample counts are refused with a reason."""
    from aggregators.service import check_sample_count, check_update

    reference = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    value = torch.zeros(shape, dtype=dtype)
    if poison != "ok" and value.is_floating_point() and value.numel():
        value.view(-1)[0] = float(poison)
    update = {("v" if rename else "w"): value, "b": torch.zeros(3)}
    problem = check_update(update, reference)
    fine = not rename and dtype == torch.float32 and list(shape) == [2, 3] and poison == "ok"
    assert (problem is None) == fine, problem
    sample_problem = check_sample_count(n_samples, declared=1000)
    assert (sample_problem is None) == (1 <= n_samples <= 1000), sample_problem
    if problem is not None:
        assert isinstance(problem, str) and problem


def test_a_valid_message_still_opens_after_all_that(world):
    _still_serves(world)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(codec.decode(codec.encode({"a": arr}))["a"], arr)
