"""The federation's audit trail and replays after a restart (issue 18), on real processes.

`fbm-broker audit` records every message's header while alice's job runs; its trail lists the
submission, every round's model, every update (sender, size, body hash) and the end, and the
trail's file holds no tensor bytes. Then a node and the aggregator restart, and an admin
identity (standing in for a compromised broker) re-publishes the job's captured round-1
messages: each is dropped with the reason "replayed" by the restarted processes.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from broker import cli as broker_cli
from common import topics
from common.envelope import peek_header
from common.identity import Identity
from common.settings import TransportSettings
from common.transport import Delivery, Transport
from researcher.experiment import Experiment
from tests.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ["site-1", "site-2"]


def _log_lines(fed, label: str) -> list[dict]:
    path = fed.root / "logs" / f"{label}.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x) for x in lines if x.startswith("{")]


def _capture(fed) -> tuple[Transport, list[Delivery]]:
    """An admin recording every message on the broker as it came (to replay it later)."""
    got: list[Delivery] = []
    t = Transport(Identity.load(fed.ws.bundle_dir("mallory")), TransportSettings(clean_start=True, session_expiry_s=0),
                  client_id=f"mallory:cap{uuid.uuid4().hex[:4]}", on_delivery=got.append)
    t.subscribe("fbm/v1/#")
    t.connect()
    return t, got


def _restart(fed, label: str, start, ready) -> None:
    proc = fed.process(label)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    start()
    assert wait_until(ready, 60), f"{label} did not come back"


def test_audit_trail_of_a_job_and_replays_after_a_restart(sites):
    fed = sites
    recorder = fed.spawn("audit", [sys.executable, "-m", "broker", "audit", str(fed.ws.root)])
    assert wait_until(lambda: "recording" in (fed.root / "logs" / "audit.log").read_text(), 60)
    time.sleep(1.0)
    capture, captured = _capture(fed)
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], quorum=2, rounds=2,
                     model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                     training_args={"epochs": 1, "lr": 0.05, "batch_size": 50}, round_deadline_s=60)
    try:
        job = exp.submit()
        state = exp.watch(timeout_s=120, progress=False)
        assert state.status == "done", state.reason
        time.sleep(1.0)
    finally:
        exp.close()
        capture.close()
        recorder.send_signal(signal.SIGTERM)
        recorder.wait(30)

    # --- the trail ------------------------------------------------------------------------------
    done = CliRunner().invoke(broker_cli.main, ["audit", str(fed.ws.root), "--job", job, "--json"])
    assert done.exit_code == 0, done.output
    trail = [json.loads(line) for line in done.output.splitlines() if line.startswith("{")]
    events = [(r["event"], r["round"], r["sender"]) for r in trail]
    assert events[0] == ("submitted", None, "alice"), events
    assert {(r, s) for e, r, s in events if e == "model"} >= {(0, "agg-1"), (1, "agg-1"), (2, "agg-1")}
    updates = {(r["round"], r["sender"]): r for r in trail if r["event"] == "update"}
    assert set(updates) == {(r, n) for r in (1, 2) for n in SITES}, sorted(updates)
    bodies = {(d.topic, peek_header(d.payload)["id"]): d.payload for d in captured if "/updates/" in d.topic}
    for r in updates.values():  # the recorded hash is that of the update's body as it crossed the broker
        payload = bodies[(r["topic"], r["msg_id"])]
        assert r["size"] == len(payload) and r["body_sha256"] == hashlib.sha256(peek_header(payload)["body"]).hexdigest()
    assert ("end: done", None, "agg-1") in events and events.index(("end: done", None, "agg-1")) > \
        max(i for i, e in enumerate(events) if e[0] == "update")
    assert all(r["status"] == "ok" for r in trail)
    stored = (fed.ws.root / "audit" / "audit.sqlite").read_bytes()
    for tensor in state.params.values():  # headers only: no tensor of the final model in the file
        raw = tensor.numpy().tobytes()
        assert len(raw) < 32 or raw[:32] not in stored

    # --- replays after a restart ----------------------------------------------------------------
    node_mark, agg_mark = len(_log_lines(fed, "node-site-1")), len(_log_lines(fed, "agg-agg-1"))
    _restart(fed, "node-site-1", lambda: fed.start_node("site-1"),
             lambda: any(e.get("event") == "node_started" for e in _log_lines(fed, "node-site-1")[node_mark:]))
    _restart(fed, "agg-agg-1", lambda: fed.start_aggregator("agg-1"),
             lambda: any(e.get("event") == "aggregator_started" for e in _log_lines(fed, "agg-agg-1")[agg_mark:]))
    time.sleep(2.0)
    round_one = _round_one(captured, job)
    replayer = Transport(Identity.load(fed.ws.bundle_dir("mallory")), TransportSettings(clean_start=True, session_expiry_s=0),
                         client_id=f"mallory:rep{uuid.uuid4().hex[:4]}")
    replayer.connect()
    try:
        for d in round_one:
            replayer.publish(d.topic, bytes(d.payload))
    finally:
        replayer.close()
    # the job's spec came back retained when they re-subscribed (the broker's state: it is not
    # taken again, the job ended), so its replay is a duplicate; the node's model and ack are
    # replays; the aggregator keeps no update ids across a restart (a re-send after a crash must
    # be folded: its rounds dedupe them), and drops these as updates of a job that finished
    expect_node = {topics.model("alice", job): "replayed", topics.requests("site-1"): "replayed",
                   topics.job("alice", job): "duplicate"}
    expect_agg = {**{topics.update("alice", job, n): "job_finished" for n in SITES},
                  topics.job("alice", job): "duplicate"}

    def dropped(label: str, mark: int) -> dict[str, str]:
        out = {}
        for e in _log_lines(fed, label)[mark:]:
            if e.get("event") == "message_dropped" and e.get("reason") in ("replayed", "job_finished"):
                out[e["topic"]] = e["reason"]
            elif e.get("event") == "duplicate_dropped":
                out.setdefault(e["topic"], "duplicate")
        return out

    def all_dropped() -> bool:
        node, agg = dropped("node-site-1", node_mark), dropped("agg-agg-1", agg_mark)
        return all(node.get(t) == r for t, r in expect_node.items()) and all(agg.get(t) == r for t, r in expect_agg.items())

    assert wait_until(all_dropped, 30), (dropped("node-site-1", node_mark), dropped("agg-agg-1", agg_mark),
                                         [d.topic for d in round_one])
    # and nothing was done with them: the job not taken again, no training, no new round
    assert not any(e.get("event") in ("round_opened", "job_claimed") and e.get("job") == job
                   for e in _log_lines(fed, "agg-agg-1")[agg_mark:])
    assert not any(e.get("event") in ("job_accepted", "update_sent") and e.get("job") == job
                   for e in _log_lines(fed, "node-site-1")[node_mark:])
    assert any(e.get("event") == "job_already_ended" and e.get("job") == job
               for e in _log_lines(fed, "node-site-1")[node_mark:])
    fed.wait_online(set(SITES))


def _round_one(captured: list[Delivery], job: str) -> list[Delivery]:
    """The job's spec and its round-1 messages (model, updates, acks) as they crossed the broker live."""
    keep = []
    for d in captured:
        if d.retained or not d.payload:
            continue
        head = peek_header(d.payload)
        if d.topic == topics.job("alice", job) and head.get("type") == "job" or head.get("job") == job and head.get("round") == 1 and head.get("type") in ("model", "update",
                                                                                       "update_received"):
            keep.append(d)
    return keep
