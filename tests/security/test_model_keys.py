"""Models for many nodes carry no node's key wrap: each node is given the model's content key
once (issue 21's 10,000-node round), with real node and aggregator processes.

A model sealed with one wrap per reader is O(N) bytes delivered to N nodes: O(N^2) a round
(600 KB to each of 10,000 nodes, 6 GB through the broker). Beyond `model_wraps_max` readers
(0 here, so that two nodes take that path) the aggregator gives each node the content key in a
`job_key` sealed for it, and the model carries the owner's wrap only. What must still hold:
only the job's nodes and its owner read the model, and another aggregator's key cannot stand
in for the job's (it would leave the nodes unable to open the next rounds' models).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from broker.local import LocalFederation
from common import topics
from common.envelope import sealed_recipients
from common.identity import Identity
from common.messages import JobKey
from researcher.experiment import Experiment
from scripts import fmnist
from tests.conftest import Inbox, open_transport, wait_until
from tests.security.test_hostile_peers import OnRound, Peer

pytestmark = pytest.mark.e2e

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", 3, limit=300, seed=5)
        datasets = fed.shard_datasets([*SITES, "site-other"], shards)
        datasets["site-other"][0]["tag"] = "something-else"
        fed.add_nodes(datasets)
        fed.add_aggregator("agg-1", env={"FBM_MQTT_MODEL_WRAPS_MAX": "0"})
        fed.enroll("alice", "researcher")
        fed.enroll("auditor", "admin")
        fed.wait_online({*SITES, "site-other"})
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _events(fed, node: str, event: str) -> list[dict]:
    lines = (fed.root / "logs" / f"node-{node}.log").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def _rogue_key(fed, node: str, job: str) -> str:
    """When `node` logged the key agg-rogue gave it for `job`'s models ("" if not yet)."""
    return next((e["timestamp"] for e in _events(fed, node, "job_key_received")
                 if e.get("job") == job and e.get("aggregator") == "agg-rogue"), "")


def test_nodes_open_models_with_the_key_given_once_and_not_with_another_aggregators(fed, clients):
    capture = Inbox()
    open_transport(fed, "auditor", clients, capture).subscribe(topics.every("model"))
    rogue = Peer(fed, "agg-rogue", "aggregator")
    assert rogue.m.settle_keys(SITES, timeout_s=10)
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], rounds=5, quorum=2,
                     round_deadline_s=60, model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                     training_args={"epochs": 1, "lr": 0.1, "batch_size": 32}, aggregator_identity="agg-1")

    def strike(r: int) -> None:  # when round 2 opens: a key of its own to every node, for this job's models
        if r == 2:
            for node in SITES:
                rogue.m.send(topics.requests(node), "job_key",
                             JobKey(job_id=exp.job_id, owner="alice", key=os.urandom(32), of="model"),
                             job=exp.job_id, to=[node])

    clock = OnRound(fed, exp.job_id, strike)
    try:
        exp.submit()
        state = exp.watch(timeout_s=180, progress=False)
    finally:
        clock.close()
        rogue.close()
        exp.close()
    assert state.status == "done", state.reason
    assert [sorted(r["node"] for r in h["reports"]) for h in state.history] == [SITES] * 5
    models = [d for d in capture.items if d.payload and d.topic == topics.model("alice", exp.job_id)]
    assert len(models) >= 4  # rounds 0-3
    assert all(sealed_recipients(d.payload) == ["alice"] for d in models), "a model carried the nodes' wraps"
    for node in SITES:
        assert wait_until(lambda n=node: _rogue_key(fed, n, exp.job_id), 10), f"{node} never got the rogue's key"
        given = [e for e in _events(fed, node, "job_key_received") if e.get("job") == exp.job_id and e.get("of") == "model"]
        assert len([e for e in given if e["aggregator"] == "agg-1"]) == 1, given  # once for the whole job
        # rounds were trained after the rogue's key came: the models they opened were agg-1's, with agg-1's key
        after = [e for e in _events(fed, node, "update_sent") if e["timestamp"] > _rogue_key(fed, node, exp.job_id)]
        assert after, f"{node}: the job ended before the rogue's key came: nothing was tested"
    outsider = [e for e in _events(fed, "site-other", "message_dropped")
                if e.get("topic") == topics.model("alice", exp.job_id)]
    assert outsider and all(e["reason"] == "not_a_recipient" for e in outsider)
