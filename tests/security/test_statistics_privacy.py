"""Federated statistics against a curious researcher (issue 19): extremes, fine bins, huge bins.

Each request is what a researcher with a valid certificate can send to a real node process;
what comes back must not single out a patient, and the node must stay within bounded memory
and keep answering.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.local import LocalFederation
from common.identity import Identity
from node.audit import AuditTrail
from node.datasets import LoadedData
from node.db import Database
from node.policy import StatisticsPolicy
from node.statistics import StatisticsRefused, sufficient_statistics
from researcher.analytics import federated_statistics
from researcher.ask import ask

pytestmark = pytest.mark.integration
ROWS = 40
QUOTA = 3  # statistics queries a day on site-quota's dataset


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _other_table() -> np.ndarray:
    """site-quota's cohort (site-stats' is in the fixture)."""
    rng = np.random.default_rng(11)
    return np.column_stack([rng.integers(20, 95, ROWS), rng.normal(29, 5, ROWS).round(2), rng.integers(0, 2, ROWS)])


@pytest.fixture(scope="module")
def site():
    fed = LocalFederation().start()
    try:
        rng = np.random.default_rng(7)
        table = np.column_stack([rng.integers(20, 95, ROWS), rng.normal(27, 4, ROWS).round(2), rng.integers(0, 2, ROWS)])
        path = fed.root / "cohort.csv"
        np.savetxt(path, table, delimiter=",", header="age,bmi,outcome", comments="", fmt="%g")
        fed.add_node("site-stats", [{"name": "cohort", "type": "csv", "path": str(path), "tag": "cohort",
                                     "target": "outcome"}])
        np.savetxt(fed.root / "cohort-2.csv", _other_table(), delimiter=",", header="age,bmi,outcome", comments="", fmt="%g")
        fed.add_node("site-quota", [{"name": "cohort", "type": "csv", "path": str(fed.root / "cohort-2.csv"),
                                     "tag": "cohort", "target": "outcome"}],
                     env={"FBM_NODE_STATISTICS__MAX_QUERIES": str(QUOTA)})
        fed.enroll("curious", "researcher")
        fed.wait_online({"site-stats", "site-quota"})
        yield fed, table
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _ask(fed, args, timeout_s=30.0, node="site-stats"):
    return ask(Identity.load(fed.ws.bundle_dir("curious")), node, "statistics",
               {"tags": ["cohort"], **args}, timeout_s=timeout_s)


def _audit(fed, node: str, event: str) -> list[dict]:
    return [e for e in AuditTrail(Database(fed.root / "nodes" / node / "node.db")).entries(limit=5000)
            if e["event"] == event]


def test_the_statistics_still_equal_the_pooled_values(site):
    fed, table = site
    pooled = federated_statistics(Identity.load(fed.ws.bundle_dir("curious")), ["site-stats", "site-quota"],
                                  tags=["cohort"], timeout_s=30)
    both = np.vstack([table, _other_table()])[:, :2]
    assert pooled.n == 2 * ROWS
    assert np.allclose(pooled.mean, both.mean(axis=0)) and np.allclose(pooled.std, both.std(axis=0))


def test_statistics_are_computed_in_a_confined_child_not_in_the_node(site):
    fed, table = site
    assert _ask(fed, {}).ok
    computed = _audit(fed, "site-stats", "statistics_sent")[0]["detail"]
    assert computed["pid"] != fed.process("node-site-stats").pid  # another process did the reading
    assert computed["confined_to"] == [str((fed.root / "cohort.csv").resolve())]  # and it could read nothing else


def test_the_query_budget_refuses_the_query_after_the_last(site):
    fed, _ = site
    replies = [_ask(fed, {}, node="site-quota") for _ in range(QUOTA + 1)]
    refused = [r for r in replies if not r.ok]
    assert refused, "no query was refused"
    assert f"its {QUOTA} statistics queries for today are spent" in refused[0].error
    assert len(_audit(fed, "site-quota", "statistics_sent")) == QUOTA  # the pooled test's query counts too
    assert any("query budget" in str(e["detail"].get("reason")) for e in _audit(fed, "site-quota", "statistics_refused"))


def test_min_and_max_are_not_sent_by_default(site):
    fed, table = site
    reply = _ask(fed, {})
    assert reply.ok, reply.error
    assert reply.data["n"] == ROWS and "min" not in reply.data and "max" not in reply.data
    assert np.allclose(reply.data["sum"], table[:, :2].sum(axis=0))  # the sums are still exact


def test_fine_bins_are_refused_and_small_cells_suppressed(site):
    fed, table = site
    fine = _ask(fed, {"bins": 10_000, "ranges": [[0.0, 100.0]]})
    assert not fine.ok and "allows 0 to 64" in fine.error
    coarse = _ask(fed, {"bins": 64, "ranges": [[0.0, 100.0]]})  # the cap: still no single patient shows
    assert coarse.ok, coarse.error
    hist = np.asarray(coarse.data["hist"])
    assert hist.shape == (2, 64) and not ((hist > 0) & (hist < 5)).any()
    assert coarse.data["suppressed_cells"] > 0


def test_a_huge_bin_count_is_refused_at_once_with_bounded_memory(site):
    fed, _ = site
    pid = fed.process("node-site-stats").pid
    before = _vm_hwm_kb(pid)
    huge = _ask(fed, {"bins": 10**8, "ranges": [[0.0, 1.0]]})
    assert not huge.ok and "histogram bins" in huge.error
    assert _vm_hwm_kb(pid) - before < 64 * 1024, "the node's peak memory grew by more than 64 MiB"
    assert ask(Identity.load(fed.ws.bundle_dir("curious")), "site-stats", "ping", timeout_s=10).ok


@pytest.mark.slow
def test_a_flood_of_requests_is_queued_or_refused_and_the_node_keeps_serving(site):
    fed, _ = site
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(_ask(fed, {"bins": 8, "ranges": [[0.0, 100.0]]}, 60)))
               for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(replies) == 12
    assert all(r.ok or "busy" in r.error for r in replies), [r.error for r in replies if not r.ok]
    assert ask(Identity.load(fed.ws.bundle_dir("curious")), "site-stats", "ping", timeout_s=10).ok


def _data(x: np.ndarray) -> LoadedData:
    return LoadedData(torch.from_numpy(x), None, {})


def test_policy_unit_cases():
    x = np.arange(100, dtype=np.float64).reshape(50, 2)
    out = sufficient_statistics(_data(x), min_rows=10, bins=10, ranges=[[0.0, 100.0]])
    assert "min" not in out and np.asarray(out["hist"]).sum() == 100 and out["suppressed_cells"] == 0
    exact = sufficient_statistics(_data(x), min_rows=10, policy=StatisticsPolicy(extremes="exact"))
    assert exact["min"] == [0.0, 1.0] and exact["max"] == [98.0, 99.0]
    sparse = sufficient_statistics(_data(x), min_rows=10, bins=50, ranges=[[0.0, 100.0]])
    assert out["n"] == 50 and np.asarray(sparse["hist"]).sum() == 0 and sparse["suppressed_cells"] == 100
    for bad in ([[1.0, 0.0]], [[0.0, float("inf")]], [[0.0]]):
        with pytest.raises(StatisticsRefused):
            sufficient_statistics(_data(x), min_rows=10, bins=4, ranges=bad)
    with pytest.raises(StatisticsRefused, match="at least 60"):
        sufficient_statistics(_data(x), min_rows=60)
