"""Each threat of SECURITY.md against the real TLS broker: sessions, forgeries, revocation.

The ACL itself (who may publish or read which topic) is checked exhaustively in
tests/integration/test_acl_matrix.py; here are the threats the ACL alone cannot stop.
The admin role (may write anything) stands in for a compromised broker that injects
messages: receivers must reject them on their own.
"""

from __future__ import annotations

import shutil
import ssl
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import topics
from common.envelope import seal
from common.errors import ConnectError, PublishDenied, Reason
from common.identity import Identity
from common.messages import JobSpec
from common.transport import Transport
from tests.conftest import Inbox, bundle, fast_settings, open_messenger, open_transport, wait_until

pytestmark = pytest.mark.integration


def _raw_connect(fed, cert_of: str, username: str, client_id: str, clean: bool = True) -> int:
    """CONNACK reason code for a hand-made connection (bypassing Transport's own rules)."""
    ident = bundle(fed, cert_of)
    got: dict = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(username)
    client.tls_set(ca_certs=str(ident.ca_path), certfile=str(ident.cert_path), keyfile=str(ident.key_path),
                   cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_connect(c, u, flags, reason_code, props):
        got["rc"] = reason_code.value
        done.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean else 300
    client.connect(ident.broker_host, fed.ws.federation().port, clean_start=clean, properties=props)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return got.get("rc", -1)


def test_no_party_can_take_over_another_partys_session(federation, clients):
    """Without the broker plugin, any valid client could connect with node-a's client id,
    kick node-a off and inherit its subscriptions (Mosquitto issue #3553)."""
    victim = open_transport(federation, "node-a", clients, settings=fast_settings(clean_start=False, session_expiry_s=300))
    assert _raw_connect(federation, "node-b", "node-b", "node-a") == 135  # someone else's client id
    assert _raw_connect(federation, "node-b", "node-b", "node-a:x") == 135
    assert _raw_connect(federation, "node-b", "node-a", "node-a") == 135  # someone else's name
    assert _raw_connect(federation, "agg-1", "agg-1", "agg-1x") == 135  # prefix without the separator
    assert _raw_connect(federation, "node-b", "node-b", "node-b:tool") == 0  # its own: fine
    assert victim.connected
    victim.publish(topics.status("node-a"), b"", retain=True)  # still works, still node-a


def test_a_node_cannot_post_a_job_or_a_model_or_as_another_node(federation, clients):
    for who, topic in [("node-a", topics.job("node-a", "t1")), ("agg-1", topics.job("res-1", "t1")),
                       ("node-a", topics.model("res-1", "t1")), ("node-b", topics.update("res-1", "t1", "node-a")),
                       ("node-b", topics.replies("node-a", "res-1")),
                       # a researcher writes only under its own name (issue 18): not another's job
                       # nor its chunks, so it can neither replace, withdraw nor clear it
                       ("res-2", topics.job("res-1", "t1")), ("res-2", topics.chunk(topics.job("res-1", "t1"), 0))]:
        sender = open_transport(federation, who, clients)
        with pytest.raises(PublishDenied):
            sender.publish(topic, b"refused before anyone reads it")


def test_forged_job_model_and_update_injected_past_the_acl_are_rejected(federation, clients):
    """A compromised broker (here: an admin client) injects messages with valid signatures of
    the wrong role, or on another identity's topic: receivers drop each with its reason."""
    rejected: list[tuple[str, Reason]] = []
    node = open_messenger(federation, "node-a", clients)
    node.on_reject(lambda topic, exc: rejected.append((topic, exc.reason)))
    got = Inbox()
    node.subscribe(topics.every("job"), got, types={"job", "withdraw"})
    node.subscribe(topics.every("model"), got, types={"model"})
    aggregator = open_messenger(federation, "agg-1", clients)
    aggregator.on_reject(lambda topic, exc: rejected.append((topic, exc.reason)))
    aggregator.subscribe(topics.every("update"), got, types={"update"})
    injector = open_transport(federation, "admin-1", clients)

    spec = JobSpec(job_id="evil", owner="node-b", plan={"zoo": "mlp"}, rounds=1, tags=["x"])
    res2 = bundle(federation, "res-2")
    t_job, t_model = topics.job("node-b", "evil"), topics.model("node-b", "evil")
    t_update = topics.update("node-b", "evil", "node-a")
    # valid certs and signatures, but the certs say node / researcher: seal() would refuse, so
    # the forger claims another role locally
    _, job_by_node = seal(_claiming(bundle(federation, "node-b"), "researcher"), "job", spec, job="evil", topic=t_job)
    _, model_by_researcher = seal(_claiming(bundle(federation, "res-1"), "aggregator"), "model",
                                  {"round": 0, "params": {}, "status": "running"}, job="evil", topic=t_model)
    _, update_by_b = seal(bundle(federation, "node-b"), "update", {"round": 1, "params": {}, "n_samples": 1},
                          job="evil", round_=1, topic=t_update)  # node-b posing as node-a
    # researcher res-2 signs a job naming res-1 its owner, a job of its own on res-1's topic, and
    # a withdrawal of res-1's job (issue 18: owner == signer == the topic's owner, or an admin)
    t_lie, t_other, t_withdraw = topics.job("res-2", "evil2"), topics.job("res-1", "evil3"), topics.job("res-1", "evil4")
    _, owner_lie = seal(res2, "job", spec.model_copy(update={"owner": "res-1", "job_id": "evil2"}), job="evil2",
                        topic=t_lie)
    _, on_other_topic = seal(res2, "job", spec.model_copy(update={"owner": "res-2", "job_id": "evil3"}), job="evil3",
                             topic=t_other)
    _, withdraw_other = seal(res2, "withdraw", {"job_id": "evil4"}, job="evil4", topic=t_withdraw)
    # and a valid job of res-2's, signed for its own topic, moved to another job's topic: the
    # topic is signed (issue 18)
    _, moved = seal(res2, "job", spec.model_copy(update={"owner": "res-2", "job_id": "evil5"}), job="evil5",
                    topic=topics.job("res-2", "evil5"))
    sent = {t_job: job_by_node, t_model: model_by_researcher, t_update: update_by_b, t_lie: owner_lie,
            t_other: on_other_topic, t_withdraw: withdraw_other, topics.job("res-2", "evil6"): moved}
    for topic, wire in sent.items():
        injector.publish(topic, wire)
    assert wait_until(lambda: len(rejected) == len(sent), 10), rejected
    assert [m for m in got.items if m.topic in sent] == []  # (other tests' retained withdrawals may arrive)
    assert dict(rejected) == {
        t_job: Reason.ROLE_NOT_ALLOWED, t_model: Reason.ROLE_NOT_ALLOWED, t_update: Reason.WRONG_TOPIC,
        t_lie: Reason.WRONG_OWNER, t_other: Reason.WRONG_TOPIC, t_withdraw: Reason.WRONG_TOPIC,
        topics.job("res-2", "evil6"): Reason.BAD_SIGNATURE}


def _claiming(identity: Identity, role: str) -> Identity:
    return Identity(**{**identity.__dict__, "role": role})


@pytest.fixture
def revocable(own_federation):
    yield own_federation


def test_a_revoked_identity_is_cut_off_and_cannot_reconnect(revocable, clients, tmp_path):
    fed = revocable
    old_bundle = tmp_path / "node-a-old"
    shutil.copytree(fed.ws.bundle_dir("node-a"), old_bundle)
    cut = open_transport(fed, "node-a", clients, settings=fast_settings(reconnect_max_s=1))
    bystander = open_transport(fed, "node-b", clients)
    fed.run_cli("broker", "revoke", str(fed.ws.root), "--id", "node-a")

    assert wait_until(lambda: not cut.connected, 10), "the revoked identity's connection was not closed"
    assert wait_until(lambda: "certificate revoked" in fed.ws.log_file.read_text(), 10)
    with pytest.raises(ConnectError, match="(?i)not authori[sz]ed"):
        Transport(Identity.load(old_bundle), fast_settings(connect_timeout_s=3)).connect()
    assert bystander.connected  # nobody else was disturbed, no broker restart
    bystander.publish(topics.status("node-b"), b"", retain=True)

    # the site is re-enrolled with a new key: the new bundle connects, the old one stays refused
    fed.run_cli("broker", "enroll", str(fed.ws.root), "--role", "node", "--id", "node-a", "--force")
    open_transport(fed, "node-a", clients)
    with pytest.raises(ConnectError, match="(?i)not authori[sz]ed"):
        Transport(Identity.load(old_bundle), fast_settings(connect_timeout_s=3)).connect()


def test_a_certificate_is_renewed_for_the_same_key(own_federation, clients):
    fed = own_federation
    folder = fed.ws.bundle_dir("node-b")
    key, cert = (folder / "identity.key").read_bytes(), (folder / "identity.crt").read_bytes()
    before = fed.ws.identities()["node-b"]["not_after"]
    fed.run_cli("broker", "renew", str(fed.ws.root), "--id", "node-b", "--days", "1000")
    assert (folder / "identity.key").read_bytes() == key
    assert (folder / "identity.crt").read_bytes() != cert
    assert fed.ws.identities()["node-b"]["not_after"] > before
    renewed = open_transport(fed, "node-b", clients)
    _, wire = seal(Identity.load(folder), "node_status", {"state": "online"})
    renewed.publish(topics.status("node-b"), wire, retain=True)
    assert "not_after" in fed.ws.identities()["node-b"] and len(fed.ws.identities()["node-b"]["certs"]) == 2
