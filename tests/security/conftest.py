"""A small live federation shared by the security tests that need real node/aggregator processes."""

from __future__ import annotations

import shutil

import pytest

from broker.local import LocalFederation
from scripts import fmnist

NODES = ["site-1", "site-2"]


@pytest.fixture(scope="session")
def sites():
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", len(NODES), limit=400, seed=4)
        fed.add_nodes(fed.shard_datasets(NODES, shards), env={"FBM_NODE_PLAN_POLL_S": "0.5"})
        fed.add_aggregator("agg-1")
        fed.enroll("alice", "researcher")
        fed.enroll("mallory", "admin")  # stands in for a compromised broker: may write anything
        fed.wait_online(set(NODES))
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)
