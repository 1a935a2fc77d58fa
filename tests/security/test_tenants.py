"""Several research teams on one federation (issue 18): ownership and isolation, live.

A federation of its own (the shared `sites` has two nodes and one aggregator): three nodes
site-1..3 with fmnist shards, two aggregators agg-1 and agg-2 started together as a fleet
(issue 23: either may claim a job), and two researchers, alice and bob, each with a valid
certificate. Alice's jobs name `nodes=[site-1, site-2]`; site-3 is enrolled, online and holds
a dataset with the job's tags, but is not in them.

Bob attacks alice's running job with the project's own clients (`fbm-researcher withdraw`, an
Experiment that re-submits under alice's job id) and with a raw paho client (an empty
retained message on alice's job topic and its chunks). Every attack must be refused at the
broker or ignored by every receiver: both aggregators (the one that claimed alice's job and
the other) and alice's two nodes log `foreign_owner_dropped`; site-3 cannot even open bob's
look-alike spec. Alice's job completes with the same final model as an undisturbed run, and
the attacked job's id is chosen so that the other aggregator claims it: FedAvg of two nodes
sums the same two float64 products in either order, so the model depends neither on the
aggregator nor on the arrival order (docs/design.md, "Failover"); nothing is pinned.

Bob, subscribed to `#` and to every filter his ACL grants, receives nothing of alice's job and
none of the replies to alice's requests. A raw client with site-3's certificate, subscribed
likewise, may receive alice's spec and models (a node's ACL reads every job and model) but
cannot open them (`not_a_recipient`) while site-1's keyring opens the same bytes; site-3
never trains for the job.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.local import LocalFederation
from common import protocol, topics
from common.chunking import Reassembler, frame_kind
from common.envelope import open_envelope, verify_envelope
from common.errors import BadMessage, Reason
from common.identity import Identity, TrustStore
from common.sealed import Keyring
from researcher import cli as researcher_cli
from researcher.ask import ask
from researcher.experiment import Experiment, JobState, new_job_id
from scripts import fmnist
from tests.security.test_hostile_peers import OnRound, _finish, _folded, _same, run_undisturbed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODES = ["site-1", "site-2", "site-3"]
SITES = ["site-1", "site-2"]  # alice's jobs' `nodes`: site-3 is not in them
AGGS = ("agg-1", "agg-2")
ROUNDS = 100  # the attacks strike in round 1 and take ~10 s: the job (fast rounds) must outlast them
MODEL = {"in_features": 784, "hidden": [16], "n_classes": 10}
# what a node logs when it takes part in a job (none of it may appear at site-3 for alice's job)
TOOK_PART = {"job_accepted", "job_pending_plan_approval", "update_sent", "update_masked", "round_failed"}


@pytest.fixture(scope="module")
def tenants():
    """Three nodes (200 fmnist samples each), a fleet of two aggregators, alice and bob."""
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", len(NODES), limit=200 * len(NODES), seed=4)
        fed.add_nodes(fed.shard_datasets(NODES, shards), env={"FBM_NODE_PLAN_POLL_S": "0.5"})
        for name in AGGS:
            fed.add_aggregator(name, start=False)
        for name in AGGS:  # spawned one right after the other: they start at the same moment
            fed.start_aggregator(name)
        for name in ("alice", "bob"):
            fed.enroll(name, "researcher")
        fed.wait_online(set(NODES))  # and both aggregators
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _experiment(fed, who: str = "alice", **kw) -> Experiment:
    kw = {"rounds": ROUNDS, "round_deadline_s": 60, "nodes": SITES, **kw}
    return Experiment(Identity.load(fed.ws.bundle_dir(who)), plan="mlp", tags=["fmnist"], quorum=2,
                      model_args=MODEL, seed=2, training_args={"epochs": 100, "lr": 0.05, "batch_size": 50}, **kw)  # 100: the nodes' cap


class RawClient:
    """A plain paho MQTT 5 client with an identity's own certificate: no signing, no checks."""

    def __init__(self, fed, name: str) -> None:
        me = Identity.load(fed.ws.bundle_dir(name))
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}:raw{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(name)
        self.c.tls_set(ca_certs=str(me.ca_path), certfile=str(me.cert_path), keyfile=str(me.key_path),
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.subacks.__setitem__(mid, [rc.value for rc in codes])
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()
        self.c.connect(me.broker_host, me.broker_port, properties=Properties(PacketTypes.CONNECT))
        self.c.loop_start()
        assert connected.wait(10)

    def publish(self, topic: str, payload: bytes = b"", retain: bool = True) -> int:
        """The broker's PUBACK reason code (0: accepted, 0x87: not authorized)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        threading.Event().wait(0.2)
        return self.acks.get(info.mid, -1)

    def subscribe_all(self, role: str, name: str) -> dict[str, int]:
        """Subscribe to `#` and to every filter the role's ACL lets `name` read; the broker's
        SUBACK reason code per filter (1: granted at QoS 1; 0x87: refused)."""
        filters = ["#", *_read_filters(role, name)]
        _, mid = self.c.subscribe([(f, 1) for f in filters])
        for _ in range(100):
            if mid in self.subacks:
                break
            threading.Event().wait(0.05)
        threading.Event().wait(0.5)  # the retained messages of the filters come now
        return dict(zip(filters, self.subacks.get(mid, []), strict=False))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _read_filters(role: str, name: str) -> list[str]:
    """Every topic filter `role`'s ACL lets `name` read (common/protocol.py)."""
    return sorted({t.replace("{me}", name) for access, t in protocol.acl_rules(role) if "read" in access})


@pytest.fixture(scope="module")
def undisturbed(tenants) -> JobState:
    state = run_undisturbed(_experiment(tenants))
    assert state.aggregator in AGGS and not state.aggregators, (state.aggregator, state.aggregators)
    return state


def _job_id_won_by(aggregator: str) -> str:
    """A new job id of alice's that `aggregator` claims when the fleet is idle: equal loads are
    broken by sha256(job, name) (aggregators/claims.py, `_rank`); were the other one still
    loaded with the previous job, the load would pick `aggregator` too."""
    while True:
        job = new_job_id("alice")
        if min(AGGS, key=lambda a: hashlib.sha256(f"{job}\0{a}".encode()).hexdigest()) == aggregator:
            return job


def _withdraw_cli(fed, who: str, job: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "researcher", "withdraw", job, "--bundle",
                           str(fed.ws.bundle_dir(who)), "--wait", "2", *extra], capture_output=True, text=True,
                          timeout=60)


def _bob_strikes(fed, job: str, raw: RawClient, outcomes: dict[str, object]) -> Callable[[int], None]:
    """What bob does to alice's job `job` as its round 1 opens; each outcome kept in `outcomes`."""
    def strike(r: int) -> None:
        if r != 1:
            return
        for topic in _alice_job_topics(job):  # raw paho: clear the spec and its chunks
            outcomes[f"clear {topic}"] = raw.publish(topic)
        outcomes["raw job"] = raw.publish(_job_topic("alice", job), b"\x80", retain=True)

        def cli(key: str, *extra: str) -> None:  # the project's CLI, as bob, in-process (a process takes ~5 s to start)
            done = CliRunner().invoke(researcher_cli.main, ["withdraw", job, "--bundle", str(fed.ws.bundle_dir("bob")),
                                                            "--wait", "2", *extra])
            outcomes[key] = (done.exit_code, done.output)

        cli("cli")
        cli("cli_owner", "--owner", "alice")
        # the project's API: bob's look-alike of alice's job (same nodes) under her job id, under
        # bob's name (the only place the broker lets him write), then bob's withdrawal of it
        forged = _experiment(fed, "bob", rounds=1, job_id=job)
        try:
            forged.submit()
            forged.withdraw("bob's")
        finally:
            forged.close()

    return strike


def test_another_researcher_cannot_withdraw_replace_or_clear_a_job(tenants, undisturbed):
    """Red before: bob's empty retained message on alice's job topic ended her job
    ("the researcher withdrew the job"); `fbm-researcher withdraw` by bob did the same."""
    fed = tenants
    other = next(a for a in AGGS if a != undisturbed.aggregator)
    exp = _experiment(fed, job_id=_job_id_won_by(other))  # the same model from the other aggregator
    job = exp.job_id
    raw = RawClient(fed, "bob")
    outcomes: dict[str, object] = {}
    clock = OnRound(fed, job, _bob_strikes(fed, job, raw, outcomes), aggregators=AGGS)
    try:
        exp.submit()
        state = _finish(exp)
    finally:
        clock.close()
        raw.close()
    assert not clock.errors, clock.errors  # the attacks themselves ran
    assert state.status == "done", (state.reason, outcomes)
    assert _folded(state) == [SITES] * ROUNDS
    assert (state.aggregator, state.aggregators) == (other, []), (undisturbed.aggregator, state.aggregator)
    print(f"undisturbed run by {undisturbed.aggregator}, attacked run by {state.aggregator}")
    assert _same(state.params, undisturbed.params), "the final model differs from the undisturbed run's"
    code, text = outcomes["cli"]
    assert code != 0 and "not yours" in text, text
    code, text = outcomes["cli_owner"]
    assert code != 0 and "not yours" in text, text
    for key, value in outcomes.items():
        if key.startswith(("clear ", "raw ")):
            assert value == 0x87, (key, value)  # refused at the broker: bob may not write there
    # and as a process, once the job is done: still refused, alice's job still on the broker
    later = _withdraw_cli(fed, "bob", job, "--owner", "alice")
    assert later.returncode == 3 and "not yours" in later.stdout + later.stderr, later
    assert Experiment.attach(Identity.load(fed.ws.bundle_dir("alice")), job).state.status == "done"
    _assert_ignored_by_every_receiver(fed, job)


def _assert_ignored_by_every_receiver(fed, job: str) -> None:
    """Bob's spec and withdrawal under alice's job id reached every receiver, which dropped
    them: both aggregators (the holder of the claim and the other) and alice's nodes as
    another owner's; site-3, which cannot open alice's job, could not open bob's spec either
    (sealed for the same nodes) and took no part in either."""
    for label in (*(f"agg-{a}" for a in AGGS), *(f"node-{n}" for n in SITES)):
        dropped = {e.get("type") for e in _log_events(fed, label, "foreign_owner_dropped") if e.get("job") == job}
        assert dropped >= {"job", "withdraw"}, (label, dropped)
    sealed_away = {e.get("topic") for e in _log_events(fed, "node-site-3", "message_dropped")
                   if e.get("reason") == "not_a_recipient"}
    assert {_job_topic("alice", job), _job_topic("bob", job)} <= sealed_away, sealed_away
    assert not _took_part(fed, "site-3", job)


def test_another_researcher_reads_nothing_of_a_job_nor_replies_to_others(tenants):
    """Red before: bob's plain subscription to everything got alice's job spec, models, history,
    events and the nodes' replies to alice's requests."""
    fed = tenants
    raw = RawClient(fed, "bob")
    granted = raw.subscribe_all("researcher", "bob")
    exp = _experiment(fed, rounds=1)
    try:
        exp.submit()
        state = _finish(exp)
        alice = Identity.load(fed.ws.bundle_dir("alice"))
        assert ask(alice, "site-1", "list_datasets").ok
        stats = ask(alice, "site-2", "statistics", {"tags": ["fmnist"]}, timeout_s=90)  # answered or refused: to alice alone
        assert stats.command == "statistics"
        threading.Event().wait(1.0)
    finally:
        raw.close()
    assert granted and all(code < 0x80 for code in granted.values()), granted  # bob listened everywhere he may
    assert state.status == "done", state.reason
    leaked = sorted({t for t, _ in raw.got if exp.job_id in t or "/replies" in t})
    assert not leaked, leaked


def test_a_node_outside_the_jobs_nodes_cannot_read_its_model(tenants):
    """site-3 (online, a dataset with the job's tags, not in alice's job's `nodes`) listens
    with a raw client on everything its ACL grants during a two-round job: of what arrives
    about the job, everything but the fleet's claims (job, state, lease: no content) is sealed
    away from site-3's keyring, and opens with site-1's, a node of the job; site-3 never took
    part. (A job's claims and spec reach every node: the ACL cannot know a job's nodes.)"""
    fed = tenants
    raw = RawClient(fed, "site-3")
    granted = raw.subscribe_all("node", "site-3")
    exp = _experiment(fed, rounds=2)
    try:
        exp.submit()
        state = _finish(exp)
        threading.Event().wait(1.0)  # the last model's delivery
    finally:
        raw.close()
    assert granted and all(code < 0x80 for code in granted.values()), granted
    assert state.status == "done", state.reason
    assert _folded(state) == [SITES] * 2
    seen = _sealed_away_from(fed, "site-3", "site-1", _about(fed, _wholes(raw.got), exp.job_id))
    print(f"site-3's raw client got, of alice's job, sealed away from it: {dict(seen)}")
    assert not _took_part(fed, "site-3", exp.job_id)


def _wholes(got: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The whole messages among raw deliveries: chunked ones put back together."""
    joiner, out = Reassembler(), []
    for topic, payload in dict.fromkeys(got):  # overlapping subscriptions (`#` and the ACL's filters) deliver twice
        kind, stream = frame_kind(payload), topic.split(f"/{protocol.CHUNK_LEVEL}/")[0]
        if kind == "chunk":
            whole = joiner.add_chunk(stream, payload)
        elif kind == "manifest":
            whole = joiner.add_manifest(stream, payload)
        else:
            whole = payload or None  # an empty payload clears a retained message: nothing to read
        if whole is not None:
            out.append((stream, bytes(whole)))
    return out


def _about(fed, wires: list[tuple[str, bytes]], job: str) -> list[tuple[str, bytes, str]]:
    """(topic, wire, type) of the signed messages about `job`: on its topics, or naming it."""
    trust = TrustStore(Identity.load(fed.ws.bundle_dir("alice")).ca_pem)
    out = []
    for topic, wire in wires:
        header = verify_envelope(wire, trust, topic).header  # every one signed by a federation identity
        if topics.job_of(topic) == job or header.get("job") == job:
            out.append((topic, wire, header["type"]))
    return out


def _sealed_away_from(fed, outsider: str, insider: str, about: list[tuple[str, bytes, str]]) -> Counter:
    """Check each message but the claims: `outsider`'s keyring cannot open it, `insider`'s can."""
    trust = TrustStore(Identity.load(fed.ws.bundle_dir("alice")).ca_pem)
    ring = {n: Keyring.of(n, Identity.load(fed.ws.bundle_dir(n)).key) for n in (outsider, insider)}
    seen: Counter = Counter()
    for topic, wire, type_ in about:
        if type_ == "job_claim":  # which aggregator runs the job, and its lease: in clear, no content
            continue
        with pytest.raises(BadMessage) as err:
            open_envelope(wire, trust, topic, keyring=ring[outsider])
        assert err.value.reason == Reason.NOT_A_RECIPIENT, (topic, type_, err.value)
        assert open_envelope(wire, trust, topic, keyring=ring[insider]).sealed, (topic, type_)
        seen[type_] += 1
    return seen


def _took_part(fed, node: str, job: str) -> list[dict]:
    """What `node` logged of taking part in `job` (accepting it, training a round of it)."""
    lines = (fed.root / "logs" / f"node-{node}.log").read_text().splitlines()
    events = (json.loads(x) for x in lines if x.startswith("{"))
    return [e for e in events if e.get("job") == job and e.get("event") in TOOK_PART]


def _log_events(fed, label: str, event: str) -> list[dict]:
    lines = (fed.root / "logs" / f"{label}.log").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def _job_topic(owner: str, job: str) -> str:
    return topics.job(owner, job)


def _alice_job_topics(job: str) -> list[str]:
    base = _job_topic("alice", job)
    return [base, *(topics.chunk(base, i) for i in range(3))]
