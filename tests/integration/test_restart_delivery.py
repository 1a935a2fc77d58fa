"""Nothing delivered before a job is known may be lost for good (issue 15, defect 1).

A restarted aggregator's persistent session hands it the updates queued while it was away,
before it knows their job again. Such an update must stay deliverable: the node's re-send of
the same message id is folded, not dropped as a duplicate of a message nobody processed.
"""

from __future__ import annotations

import time

import pytest
import torch

from aggregators.service import AggregatorService
from common import topics
from common.envelope import seal
from common.messages import DatasetInfo, JobSpec, NodeStatus
from common.messenger import Messenger
from tests.conftest import Inbox, bundle, fast_settings, open_messenger, wait_until

pytestmark = pytest.mark.integration

PARAMS = {"w": torch.zeros(3), "b": torch.zeros(1)}


def _job(job_id: str) -> JobSpec:
    return JobSpec(job_id=job_id, owner="res-1", plan={"zoo": "logreg"}, rounds=1, tags=["restart"],
                   initial_params=PARAMS, quorum=1, round_deadline_s=8.0,
                   aggregator={"name": "fedavg", "identity": "agg-1"})


def test_an_update_delivered_before_its_job_is_known_is_folded_when_re_sent(own_federation, clients, tmp_path):
    federation = own_federation  # its retained model and history stay off the shared broker
    """Deterministic: the update reaches the aggregator before the job does (as a resumed
    session delivers it); the node then re-sends it with the same id once the round opens."""
    job_id = f"restart-{int(time.time() * 1000)}"
    node: Messenger = open_messenger(federation, "node-a", clients)
    acks = Inbox()
    node.subscribe(topics.requests("node-a"), acks, types={"update_received"})
    node.send(topics.status("node-a"), "node_status",
              NodeStatus(state="online", datasets=[DatasetInfo(name="d", tags=["restart"], type="csv", n_samples=10)]),
              retain=True)
    (tmp_path / "agg").mkdir()
    service = AggregatorService(bundle(federation, "agg-1"), tmp_path / "agg", fast_settings())
    service.start()
    try:
        assert wait_until(lambda: "node-a" in service.nodes, 10)
        update = {"round": 1, "params": {"w": torch.ones(3), "b": torch.ones(1)}, "n_samples": 10}
        msg_id, wire = seal(bundle(federation, "node-a"), "update", update, job=job_id, round_=1,
                            topic=topics.update("res-1", job_id, "node-a"))
        # 1. delivered first, as a resumed session would: no job yet
        service.messenger._on_delivery(_delivery(topics.update("res-1", job_id, "node-a"), wire))
        # 2. the job arrives, its round opens for node-a
        researcher = open_messenger(federation, "res-1", clients)
        researcher.send(topics.job("res-1", job_id), "job", _job(job_id), job=job_id, retain=True)
        # 3. the node re-sends the very same message (same id), as it does until acknowledged
        time.sleep(1.0)
        node.transport.publish(topics.update("res-1", job_id, "node-a"), wire)
        assert acks.wait_for(lambda items: any(m.job == job_id for m in items), 6.0), \
            "the re-sent update was dropped as a duplicate of one that was never processed"
    finally:
        service.stop()
        researcher_clear(federation, clients, job_id)


def _delivery(topic: str, wire: bytes):
    from common.transport import Delivery

    return Delivery(topic, wire, False)


def researcher_clear(federation, clients, job_id: str) -> None:
    for client in clients:
        if client.identity.name == "res-1":
            client.clear(topics.job("res-1", job_id))
