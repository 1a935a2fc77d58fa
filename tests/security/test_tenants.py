"""Several research teams on one federation (issue 18): ownership and isolation, live.

Two researchers, alice and bob, each with a valid certificate. Bob attacks alice's running
job with the project's own clients (`fbm-researcher withdraw`, an Experiment that re-submits
under alice's job id) and with a raw paho client (an empty retained message on alice's job
topic and its chunks). Every attack must be refused at the broker or ignored by every
receiver: alice's job completes with the same final model as an undisturbed run. Bob,
subscribed to everything his ACL lets him ask for, receives nothing of alice's job and none
of the replies to alice's requests.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import topics
from common.identity import Identity
from researcher import cli as researcher_cli
from researcher.ask import ask
from researcher.experiment import Experiment, JobState
from tests.security.test_hostile_peers import OnRound, _finish, _folded, _same, run_undisturbed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ["site-1", "site-2"]
ROUNDS = 100  # the attacks strike in round 1 and take ~10 s: the job (fast rounds) must outlast them
MODEL = {"in_features": 784, "hidden": [16], "n_classes": 10}


def _experiment(fed, who: str = "alice", **kw) -> Experiment:
    kw = {"rounds": ROUNDS, "round_deadline_s": 60, **kw}
    return Experiment(Identity.load(fed.ws.bundle_dir(who)), plan="mlp", tags=["fmnist"], quorum=2,
                      model_args=MODEL, seed=2, training_args={"epochs": 100, "lr": 0.05, "batch_size": 50}, **kw)  # 100: the nodes' cap


class RawClient:
    """A plain paho MQTT 5 client with bob's own certificate: no signing, no checks."""

    def __init__(self, fed, name: str) -> None:
        me = Identity.load(fed.ws.bundle_dir(name))
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}:raw{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(name)
        self.c.tls_set(ca_certs=str(me.ca_path), certfile=str(me.cert_path), keyfile=str(me.key_path),
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
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

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture(scope="module")
def tenants(sites):
    sites.enroll("bob", "researcher")
    return sites


@pytest.fixture(scope="module")
def undisturbed(tenants) -> JobState:
    return run_undisturbed(_experiment(tenants))


def _withdraw_cli(fed, who: str, job: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "researcher", "withdraw", job, "--bundle",
                           str(fed.ws.bundle_dir(who)), "--wait", "2", *extra], capture_output=True, text=True,
                          timeout=60)


def test_another_researcher_cannot_withdraw_replace_or_clear_a_job(tenants, undisturbed):
    """Red before: bob's empty retained message on alice's job topic ended her job
    ("the researcher withdrew the job"); `fbm-researcher withdraw` by bob did the same."""
    fed = tenants
    exp = _experiment(fed)
    job = exp.job_id
    raw = RawClient(fed, "bob")
    outcomes: dict[str, object] = {}

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
        # the project's API: bob's own spec under alice's job id (under bob's name: the only
        # place the broker lets him write), then bob's withdrawal of it
        forged = _experiment(fed, "bob", rounds=1, job_id=job)
        try:
            forged.submit()
            forged.withdraw("bob's")
        finally:
            forged.close()

    clock = OnRound(fed, job, strike)
    try:
        exp.submit()
        state = _finish(exp)
    finally:
        clock.close()
        raw.close()
    assert not clock.errors, clock.errors  # the attacks themselves ran
    assert state.status == "done", (state.reason, outcomes)
    assert _folded(state) == [SITES] * ROUNDS
    assert _same(state.params, undisturbed.params), "the final model differs from the undisturbed run's"
    code, text = outcomes["cli"]
    assert code != 0 and "not yours" in text, text
    # and as a process, once the job is done: still refused, alice's job still on the broker
    later = _withdraw_cli(fed, "bob", job, "--owner", "alice")
    assert later.returncode == 3 and "not yours" in later.stdout + later.stderr, later
    assert Experiment.attach(Identity.load(fed.ws.bundle_dir("alice")), job).state.status == "done"
    # bob's spec and bob's withdrawal under alice's job id reached every receiver, which dropped them
    for label in (*(f"node-{n}" for n in SITES), "agg-agg-1"):
        dropped = {e.get("type") for e in _log_events(fed, label, "foreign_owner_dropped") if e.get("job") == job}
        assert dropped >= {"job", "withdraw"}, (label, dropped)
    code, text = outcomes["cli_owner"]
    assert code != 0 and "not yours" in text, text
    for key, value in outcomes.items():
        if key.startswith(("clear ", "raw ")):
            assert value == 0x87, (key, value)  # refused at the broker: bob may not write there


def test_another_researcher_reads_nothing_of_a_job_nor_replies_to_others(tenants):
    """Red before: bob's plain subscription to everything got alice's job spec, models, history,
    events and the nodes' replies to alice's requests."""
    fed = tenants
    raw = RawClient(fed, "bob")
    raw.c.subscribe("fbm/v1/#", qos=1)
    threading.Event().wait(0.5)
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
    assert state.status == "done", state.reason
    leaked = sorted({t for t, _ in raw.got if exp.job_id in t or "/replies" in t})
    assert not leaked, leaked


def _log_events(fed, label: str, event: str) -> list[dict]:
    lines = (fed.root / "logs" / f"{label}.log").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def _job_topic(owner: str, job: str) -> str:
    return topics.job(owner, job)


def _alice_job_topics(job: str) -> list[str]:
    base = _job_topic("alice", job)
    return [base, *(topics.chunk(base, i) for i in range(3))]
