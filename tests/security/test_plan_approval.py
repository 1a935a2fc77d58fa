"""Plans run only once the node's admin approved their exact source (real broker, nodes, CLI)."""

from __future__ import annotations

import time

import pytest

from common.identity import Identity
from common.training.loader import source_sha256
from node.audit import AuditTrail
from node.db import Database
from researcher.ask import ask
from researcher.experiment import Experiment
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

NODES = ["site-1", "site-2"]
PLAN = '''
from common.training.zoo import MLPPlan

class TinyMLP(MLPPlan):
    """A researcher's own plan (here: the zoo MLP under another name)."""
'''


@pytest.fixture
def fed(sites):
    return sites


def _audit(fed, node: str, job: str) -> list[str]:
    return [e["event"] for e in AuditTrail(Database(fed.root / "nodes" / node / "node.db")).entries(job)]


def _notices(exp: Experiment, node: str, status: str) -> list[dict]:
    exp.poll(0.2)
    return [n for n in exp.state.notices if n["node"] == node and n["data"].get("status") == status]


def test_an_unapproved_plan_waits_and_runs_only_where_approved(fed, tmp_path):
    plan = tmp_path / "tiny_plan.py"
    plan.write_text(PLAN)
    sha = source_sha256(PLAN)
    alice = Identity.load(fed.ws.bundle_dir("alice"))
    exp = Experiment(alice, plan=plan, plan_class="TinyMLP", tags=["fmnist"], rounds=2, quorum=1, round_deadline_s=60,
                     model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                     training_args={"epochs": 1, "lr": 0.05, "batch_size": 50}, seed=1)
    job = exp.submit()

    # both nodes park the job and say so; asked, they report the plan as pending
    assert wait_until(lambda: all(_notices(exp, n, "pending") for n in NODES), 30)
    assert "awaits approval" in _notices(exp, "site-1", "pending")[0]["error"]
    assert ask(alice, "site-1", "plan_status", {"plan": sha}).data["status"] == "pending"
    assert ask(alice, "site-1", "plan_status", {"plan": "zoo:mlp"}).data["status"] == "approved"
    assert "job_pending" in _audit(fed, "site-1", job)
    assert "round_trained" not in _audit(fed, "site-1", job)

    # the admin of site-1 reads the plan, then approves it by an id prefix; site-1 joins the open round
    listed = fed.run_cli("node", "plan", "list", "--dir", str(fed.root / "nodes" / "site-1"), "--status", "pending")
    assert sha[:16] in listed
    fed.run_cli("node", "plan", "approve", sha[:10], "--dir", str(fed.root / "nodes" / "site-1"), "--note", "read it")
    t0 = time.monotonic()
    state = exp.watch(timeout_s=120, progress=False)
    assert state.status == "done", state.reason
    # site-2's "pending" reached the aggregator although it came before the claim settled: no
    # round waited for it until its 60 s deadline
    assert time.monotonic() - t0 < 40, "a round waited for a node whose plan awaits approval"
    assert [sorted(rep["node"] for rep in r["reports"]) for r in state.history] == [["site-1"], ["site-1"]]
    assert _audit(fed, "site-1", job).count("round_trained") == 2
    assert "round_trained" not in _audit(fed, "site-2", job)

    # site-2's admin rejects it: asked again, site-2 says so; a new job with it is declined at once
    fed.run_cli("node", "plan", "reject", sha[:10], "--dir", str(fed.root / "nodes" / "site-2"))
    assert ask(alice, "site-2", "plan_status", {"plan": sha}).data["status"] == "rejected"
    admin_events = [e["event"] for e in AuditTrail(Database(fed.root / "nodes" / "site-2" / "node.db")).entries()]
    assert "plan_rejected" in admin_events
    exp.close()
    exp2 = Experiment(alice, plan=plan, plan_class="TinyMLP", tags=["fmnist"], rounds=1, quorum=1, round_deadline_s=30,
                      model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                      training_args={"epochs": 1, "lr": 0.05, "batch_size": 50})
    exp2.submit()
    assert wait_until(lambda: _notices(exp2, "site-2", "declined"), 30)
    assert "rejected by the admin of node site-2" in _notices(exp2, "site-2", "declined")[0]["error"]
    assert exp2.watch(timeout_s=60, progress=False).status == "done"  # site-1 approved it
    exp2.close()
