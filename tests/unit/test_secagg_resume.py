"""A secure round checkpointed at every stage: an aggregator restarted mid-round resumes it from
the last published stage, and the sites (which keep their keys and repeat their answers) finish
it with the same sum. In-process: the JobRunner of aggregators/service.py, the sites' SiteRounds,
the broker replaced by tests/unit/test_secagg_runner.py's fake messenger."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregators.rules import get_rule
from aggregators.secagg import unpack
from aggregators.service import JobRunner, _Event
from common.secagg.config import SecAggConfig
from common.secagg.encoding import Encoding
from common.secagg.server import Deadlines, Publish, ServerSecAgg
from common.secagg.site import SiteSecAgg
from common.secagg.stages import Stage
from node.secagg import SiteRound
from tests.unit.test_secagg_runner import COUNTS, SITES, FakeMessenger, FakeService, message, spec


class Crash(Exception):
    """The aggregator process dies."""


class CrashingMessenger(FakeMessenger):
    """Delivers each state to the sites; dies right after delivering the stage `crash_at`: the
    sites' answers to it are lost with the dead process's queue."""

    def __init__(self, crash_at: str | None) -> None:
        super().__init__()
        self.crash_at = crash_at

    def send(self, topic, type_, body, **kw):
        out = super().send(topic, type_, body, **kw)
        if type_ == "secagg_state" and body.stage == self.crash_at:
            self.crash_at = None
            raise Crash(body.stage)
        return out


def sites_for(job, target: dict) -> tuple[dict, dict]:
    torch.manual_seed(0)
    ref = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    trained = {s: {k: v + 0.1 * torch.randn_like(v) for k, v in ref.items()} for s in SITES}

    def sender(name: str):
        return lambda topic, type_, body: target["runner"].events.put(
            _Event("secagg", node=name, message=message(type_, name, body)))

    return ref, {s: SiteRound(job, 1, s, ref, trained[s], COUNTS[s], send=sender(s)) for s in SITES}, trained


@pytest.mark.parametrize("stage", ["keys", "shares", "masked", "unmask"])
def test_an_aggregator_restarted_mid_round_resumes_it_with_the_same_sum(tmp_path, stage):
    job, target = spec(), {}
    first = JobRunner(job, FakeService(tmp_path))  # type: ignore[arg-type]
    first.service.messenger = CrashingMessenger(stage)
    target["runner"] = first
    ref, sites, trained = sites_for(job, target)
    first.service.messenger.sites.update(sites)
    with pytest.raises(Crash):
        first._round(1, get_rule("fedavg", {}), ref, [])
    resume = first.service.checkpoints.load_open("j1")
    assert resume is not None and unpack(resume["secagg"])["stage"] == stage
    # a new process: same checkpoint folder, its own queue; the sites live on (keys in memory)
    second = JobRunner(job, FakeService(tmp_path))  # type: ignore[arg-type]
    second.service.messenger.sites.update(sites)
    target["runner"] = second
    new, summary = second._round(1, get_rule("fedavg", {}), ref, [], resume=resume)
    total = sum(COUNTS.values())
    assert summary.notes["secure_aggregation"] == {"included": SITES, "dropped": [], "total_count": total}
    for k in ref:
        assert torch.allclose(new[k], sum(COUNTS[s] * trained[s][k] for s in SITES) / total, atol=1e-6)
    states = [b.stage for _, ty, b in second.service.messenger.sent if ty == "secagg_state"]
    assert states[0] == stage and states[-1] == "done"  # the stage published again first


def test_a_snapshot_resumes_the_pure_server_with_the_deadlines_moved_by_the_downtime():
    cfg = SecAggConfig("j", 1, 3, 4, Encoding(1.0, 5, 10), 8, b"r" * 16)
    names = [f"s{i}" for i in range(5)]
    server = ServerSecAgg(cfg, names, Deadlines(10, 20, 30, 40))
    sites = {n: SiteSecAgg(cfg, n, np.full(8, 0.25), 3) for n in names}
    state = server.start()[0].state
    while state.stage is not Stage.UNMASK:  # up to the unmask stage, then "crash"
        actions = [a for n in names for a in server.receive(n, sites[n].on_state(state), 5.0)]
        state = next(a.state for a in actions if isinstance(a, Publish))
    snap = server.snapshot(now=35.0)  # 5 s left in the unmask stage
    again = ServerSecAgg.resume(cfg, names, Deadlines(10, 20, 30, 40), snap, now=100.0)
    assert again.deadlines.unmask == 105.0 and again.tick(104.0) == []
    state = again.start()[0].state
    assert state == server.state
    done = [a for n in names for a in again.receive(n, sites[n].on_state(state), 101.0)]
    result = next(a.result for a in done if hasattr(a, "result"))
    assert result.total_count == 15 and np.allclose(result.weighted_sum, 5 * 3 * 0.25, atol=1e-6)
