"""Federated training through the real TLS broker, with real node and aggregator processes."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from broker import process
from broker.local import LocalFederation
from common import codec, topics
from common.envelope import open_envelope, seal
from common.errors import BadMessage, Reason
from common.identity import Identity, TrustStore
from common.messages import PlanRef
from common.messenger import Messenger
from common.sealed import Keyring
from common.training.loader import PlanError
from researcher.experiment import Experiment, researcher_settings
from scripts import fmnist
from tests.conftest import Inbox, open_transport, wait_until

pytestmark = pytest.mark.e2e

NODES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        # unequal shards so that the sample weighting matters
        shards = fmnist.write_shards(fed.root / "data", 6, limit=3600)
        sizes = {"site-1": shards[:1], "site-2": shards[1:3], "site-3": shards[3:6]}
        datasets = {}
        for name, parts in sizes.items():
            merged = fed.root / "data" / f"{name}.npz"
            arrays = [np.load(p) for p in parts]
            np.savez(merged, x=np.concatenate([a["x"] for a in arrays]), y=np.concatenate([a["y"] for a in arrays]))
            datasets[name] = [{"name": "fmnist-train", "type": "npz", "path": str(merged), "tag": ["fmnist", "images"]}]
        datasets["site-other"] = [{"name": "other", "type": "npz", "path": str(shards[0]), "tag": "something-else"}]
        fed.add_nodes(datasets)  # in parallel: each site's enrol and `dataset add` CLIs take ~1 s
        fed.add_aggregator("fedavg-1")
        fed.enroll("alice", "researcher")
        fed.wait_online({*NODES, "site-other"})
        fed.enroll("auditor", "admin")
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _bundle(fed, name):
    return Identity.load(fed.ws.bundle_dir(name))


def _windows(tensors: dict) -> dict[str, bytes]:
    """A 64-byte window (or the whole, if shorter) of each tensor's raw bytes, from its middle:
    float32 values drawn at random, so found anywhere only if the tensor is there in clear."""
    out = {}
    for key, t in tensors.items():
        raw = np.ascontiguousarray(np.asarray(t)).tobytes()
        if len(raw) >= 16:
            mid = max(0, len(raw) // 2 - 32)
            out[key] = raw[mid : mid + 64]
    return out


def _persistence(fed) -> bytes:
    """The broker's persistence file, written now (SIGUSR1 makes Mosquitto save it)."""
    db = fed.ws.broker_dir / "data" / "mosquitto.db"
    before = db.stat().st_mtime_ns if db.exists() else 0
    os.kill(process.read_pid(fed.ws), signal.SIGUSR1)
    assert wait_until(lambda: db.exists() and db.stat().st_mtime_ns != before, 10), "no persistence file written"
    time.sleep(0.5)  # let it finish writing
    return db.read_bytes()


def test_fedavg_three_nodes_two_rounds_and_the_broker_sees_no_tensor(fed, clients):
    """Also the capture test of issue 18: an admin subscribed to every topic for the whole job,
    and the broker's persistence file after it, hold no byte window of any update or model
    tensor; the aggregator opens the updates and the researcher the models, bit-identical."""
    capture = Inbox()
    open_transport(fed, "auditor", clients, capture).subscribe("fbm/v1/#")
    exp = Experiment(_bundle(fed, "alice"), plan="mlp", tags=["fmnist"], rounds=2, quorum=3,
                     model_args={"hidden": [64]}, training_args={"epochs": 1, "lr": 0.05, "batch_size": 32},
                     round_deadline_s=120)
    try:
        job = exp.submit()
        initial = exp.spec().initial_params
        state = exp.watch(timeout_s=240, progress=False)
        assert state.status == "done", state.reason
        assert [h["round"] for h in state.history] == [1, 2]
        assert all(sorted(r["node"] for r in h["reports"]) == NODES for h in state.history)
        # watch returns when the researcher has the final model; the auditor's own connection
        # may get it a moment later: its 3 models (rounds 0, 1, 2) before anything is checked
        model_topic = topics.model("alice", job)
        assert wait_until(lambda: sum(1 for d in capture.items if d.payload and d.topic == model_topic) >= 3, 10)

        wires = [d for d in capture.items if d.payload and topics.job_of(d.topic) == job]
        seen = b"".join(bytes(d.payload) for d in capture.items)
        stored = _persistence(fed)
        secrets = {f"initial {k}": w for k, w in _windows(initial).items()}
        secrets |= {f"final {k}": w for k, w in _windows(state.params).items()}
        for key, window in secrets.items():
            assert window not in seen, f"the admin capture holds the bytes of the {key} tensor"
            assert window not in stored, f"the broker's persistence file holds the bytes of the {key} tensor"

        updates, models = _open_as_recipients(fed, wires)
        # the running node outside the job got its model too (the ACL lets every node read every
        # model), and could not open it: logged and dropped, with the reason
        assert wait_until(lambda: _dropped(fed, "site-other", topics.model("alice", job), "not_a_recipient"), 10)
        for (r, node), update in updates.items():
            for key, window in _windows(update.params).items():
                assert window not in seen and window not in stored, f"round {r} update of {node}: {key} in clear"
        assert models[0].params.keys() == initial.keys()
        for key in initial:  # the round-0 model the researcher opens is her initial model, bit for bit
            assert models[0].params[key].numpy().tobytes() == initial[key].numpy().tobytes()
            assert models[2].params[key].numpy().tobytes() == state.params[key].numpy().tobytes()
        round1 = [updates[(1, n)] for n in NODES]
        assert len({u.n_samples for u in round1}) == 3  # unequal shards
        total = sum(u.n_samples for u in round1)
        for key in initial:
            expected = sum(u.params[key].double() * u.n_samples for u in round1) / total
            torch.testing.assert_close(models[1].params[key].double(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(models[1].params["net.0.weight"], initial["net.0.weight"])

        x, y = fmnist.test_tensors(2000)
        model = exp.model()
        after = fmnist.accuracy(model, x, y)
        model.load_state_dict(initial)
        before = fmnist.accuracy(model, x, y)
        assert after > before + 0.2, (before, after)

        folder = exp.results(fed.root / "results" / job)
        for name in ("job.json", "metrics.json", "rounds.csv", "nodes.csv", "model.pt", "loss.png", "node_times.png"):
            assert (folder / name).stat().st_size > 0, name
        # the node that lacks the tags said why, and the researcher saw it
        declines = [n for n in state.notices if not n["ok"]]
        assert any(n["node"] == "site-other" and "no dataset with tags" in n["error"] for n in declines)
    finally:
        exp.close()


def _dropped(fed, node: str, topic: str, reason: str) -> bool:
    for line in (fed.root / "logs" / f"node-{node}.log").read_text().splitlines():
        if '"message_dropped"' in line and f'"{topic}"' in line and f'"{reason}"' in line:
            return True
    return False


def _open_as_recipients(fed, wires):
    """Each captured update opened by the job's aggregator, each model by the researcher and
    by a node of the job (the same bytes), and neither by a node that is not in the job."""
    trust = TrustStore(_bundle(fed, "alice").ca_pem)
    ring = {n: Keyring.of(n, _bundle(fed, n).key) for n in ("fedavg-1", "alice", "site-1", "site-other")}
    updates, models = {}, {}
    for d in wires:
        kind = "update" if "/updates/" in d.topic else "model" if d.topic.endswith("/model") else None
        if kind is None:
            continue
        reader = ring["fedavg-1"] if kind == "update" else ring["alice"]
        msg = open_envelope(d.payload, trust, d.topic, keyring=reader)
        assert msg.sealed, f"{kind} of {msg.sender} crossed the broker in clear"
        for outsider in ("site-other", "alice" if kind == "update" else "fedavg-1"):
            with pytest.raises(BadMessage) as err:
                open_envelope(d.payload, trust, d.topic, keyring=ring[outsider])
            assert err.value.reason == Reason.NOT_A_RECIPIENT, outsider
        if kind == "update":
            updates[(msg.round, msg.sender)] = msg.body
            continue
        models[msg.body.round] = msg.body
        again = open_envelope(d.payload, trust, d.topic, keyring=ring["site-1"]).body
        assert all(again.params[k].numpy().tobytes() == msg.body.params[k].numpy().tobytes() for k in again.params)
    return updates, models


def test_unknown_zoo_plan_is_refused_at_submit(fed):
    with pytest.raises(PlanError, match="unknown zoo plan 'resnet9000'.*mlp"):
        Experiment(_bundle(fed, "alice"), plan="resnet9000", tags=["fmnist"])


def _raw_job_replies(fed, job_id: str, wire: bytes) -> list:
    """Publish a hand-made job and collect the nodes' replies about it."""
    replies: queue.Queue = queue.Queue()
    m = Messenger(_bundle(fed, "alice"), researcher_settings(), client_id="alice-raw")
    m.subscribe(topics.replies_to("alice"), replies.put, types={"reply"})
    m.connect()
    try:
        m.transport.publish(topics.job("alice", job_id), wire, retain=True)
        got: list = []
        wait_until(lambda: (got.extend(_drain(replies)) or len({r.sender for r in got if r.body.data.get("job") == job_id}) >= 3), 30)
        m.clear(topics.job("alice", job_id))
        return [r for r in got if r.body.data.get("job") == job_id]
    finally:
        m.close()


def _drain(q: queue.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get())
    return out


def test_job_with_unknown_plan_sent_anyway_is_declined_by_nodes(fed):
    spec = {"job_id": "bad-plan-1", "owner": "alice", "plan": PlanRef(zoo="nope").model_dump(), "rounds": 1,
            "tags": ["fmnist"], "initial_params": {}}
    _, wire = seal(_bundle(fed, "alice"), "job", spec, job="bad-plan-1", topic=topics.job("alice", "bad-plan-1"))
    replies = _raw_job_replies(fed, "bad-plan-1", wire)
    assert replies and all(not r.body.ok for r in replies)
    assert any("unknown zoo plan 'nope'" in r.body.error for r in replies)


def test_malformed_job_spec_is_refused_with_the_reason(fed):
    identity = _bundle(fed, "alice")
    _, wire = seal(identity, "job", {"job_id": "bad-spec-1", "owner": "alice", "plan": {"zoo": "mlp"},
                                     "rounds": 1, "tags": ["fmnist"]}, job="bad-spec-1",
                   topic=topics.job("alice", "bad-spec-1"))
    raw = codec.decode(wire)
    body = codec.decode(raw["body"])
    body["rounds"] = 0  # below the minimum: the schema refuses it
    raw["body"] = codec.encode(body)
    from common.envelope import _signed_bytes
    raw["sig"] = identity.sign(_signed_bytes(raw, raw["body"], topics.job("alice", "bad-spec-1")))
    replies = _raw_job_replies(fed, "bad-spec-1", codec.encode(raw))
    assert replies and all(not r.body.ok for r in replies)
    assert all("bad_body" in r.body.error and "rounds" in r.body.error for r in replies)


def test_cancelled_job_stops_everywhere(fed):
    exp = Experiment(_bundle(fed, "alice"), plan="mlp", tags=["fmnist"], rounds=500, quorum=3,
                     model_args={"hidden": [8]}, training_args={"epochs": 1, "max_batches": 2}, round_deadline_s=60)
    try:
        exp.submit()
        assert wait_until(lambda: len(exp.poll(0.2).history) >= 1, 60)
        exp.withdraw()
        state = exp.watch(timeout_s=60, progress=False)
        assert state.status == "failed" and "withdrew" in state.reason
        assert len(state.history) < 500
    finally:
        exp.close()


@pytest.mark.slow
def test_researcher_cli_submits_the_example_job_file_and_writes_results(fed, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[2] / "docs" / "examples" / "job.toml"
    bundle = str(fed.ws.bundle_dir("alice"))
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "researcher", "submit", str(example), "--bundle", bundle,
                           "--watch", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done after 5 rounds" in done.stdout
    assert (out / "loss.png").exists() and (out / "rounds.csv").read_text().count("\n") == 6
    job = done.stdout.split("submitted job ")[1].split()[0]
    status = subprocess.run([sys.executable, "-m", "researcher", "status", job, "--bundle", bundle],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "done, 5/5 rounds" in status.stdout
