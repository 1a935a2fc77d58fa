"""100 MB of tensor goes through in chunks and arrives bit-identical (queued and retained)."""

from __future__ import annotations

import pytest
import torch

from common import topics
from common.messages import GlobalModel, Update
from tests.conftest import Inbox, open_messenger

pytestmark = pytest.mark.integration

N = 25 * 1024 * 1024  # 25 M float32 = 100 MiB


@pytest.fixture(scope="module")
def big_tensor():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(N, generator=gen)


def test_update_of_100mb_arrives_bit_identical(federation, clients, big_tensor):
    inbox = Inbox()
    aggregator = open_messenger(federation, "agg-1", clients)
    aggregator.subscribe(topics.update("res-1", "big", "node-a"), inbox)
    node = open_messenger(federation, "node-a", clients)
    node.send(topics.update("res-1", "big", "node-a"), "update",
              Update(round=1, params={"w": big_tensor}, n_samples=10), job="big", round_=1)
    assert inbox.wait_for(lambda items: len(items) == 1, timeout_s=60)
    got = inbox.items[0].body.params["w"]
    assert got.dtype == torch.float32 and got.shape == big_tensor.shape
    assert torch.equal(got, big_tensor)
    assert aggregator.transport._reassembler.pending_bytes == 0


def test_retained_model_of_100mb_is_read_by_a_late_subscriber(federation, clients, big_tensor):
    aggregator = open_messenger(federation, "agg-1", clients)
    topic = topics.model("res-1", "big-retained")
    aggregator.send(topic, "model", GlobalModel(round=3, params={"w": big_tensor}), job="big-retained",
                    retain=True)
    # a smaller model replaces it and its stale chunks are cleared
    small = torch.arange(10, dtype=torch.float32)
    inbox = Inbox()
    node = open_messenger(federation, "node-a", clients)
    node.subscribe(topic, inbox, retained_chunks=True)  # subscribes after the publish: retained
    assert inbox.wait_for(lambda items: len(items) == 1, timeout_s=60)
    msg = inbox.items[0]
    assert msg.retained and msg.body.round == 3 and torch.equal(msg.body.params["w"], big_tensor)

    aggregator.send(topic, "model", GlobalModel(round=4, params={"w": small}), job="big-retained", retain=True)
    late = Inbox()
    late_node = open_messenger(federation, "node-b", clients)
    late_node.subscribe(topic, late, retained_chunks=True)
    assert late.wait_for(lambda items: any(m.body.round == 4 for m in items), timeout_s=20)
    assert torch.equal(late.items[-1].body.params["w"], small)
    aggregator.clear(topic)
