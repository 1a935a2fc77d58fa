"""An aggregator knows whose a job is after the job left it (withdrawn, or its runner gone):
the claim that says it finished is published under that owner's topics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aggregators.service import AggregatorService
from broker.workspace import Workspace
from common import topics
from common.identity import Identity


@pytest.fixture
def service(tmp_path):
    ws = Workspace(tmp_path / "fed")
    ws.init("unit", port=1)
    ws.enroll("alice", "researcher")
    ws.enroll("agg-1", "aggregator")
    return AggregatorService(Identity.load(ws.bundle_dir("agg-1")), tmp_path / "agg")


def test_the_owner_of_a_withdrawn_job_is_still_known_for_its_finished_claim(service):
    job = "alice-20261130-000000-abcdef"
    service.specs[job] = SimpleNamespace(body=SimpleNamespace(owner="alice"))
    withdrawal = SimpleNamespace(topic=topics.job("alice", job), type="withdraw", sender="alice", id="m1")
    service._withdrawn(withdrawal)
    assert job not in service.specs
    assert service.owner_of(job) == "alice"  # was "": topics.claim("", job, ...) raised, the claim was never published
    service.runners[job] = SimpleNamespace(spec=SimpleNamespace(owner="alice"))
    service.forget(job)
    assert service.owner_of(job) == "alice" and service.owner_of("bob-20261130-000000-abcdef") == ""
