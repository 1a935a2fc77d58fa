"""The aggregator's JobRunner running a secure round (aggregators/service.py `_secure_round`)
against in-process SiteRounds, the broker replaced by a fake messenger: the round folds the
sites' weighted mean as one update, never a plain update of the job, and fails with the reason
(in bounded time) when more than n - T sites are lost."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from aggregators.rules import get_rule
from aggregators.service import Checkpoints, JobFailure, JobRunner, _Event
from common import topics
from common.envelope import Message
from common.messages import AggregatorRef, JobSpec, PlanRef, SecAggState, Update
from common.settings import TransportSettings
from node.secagg import SiteRound

SITES = ["a", "b", "c", "d", "e"]
COUNTS = dict(zip(SITES, [10, 20, 30, 40, 50], strict=True))


def spec(deadline_s: float = 20.0) -> JobSpec:
    return JobSpec(job_id="j1", owner="r", plan=PlanRef(zoo="mlp"), rounds=1, tags=["t"], quorum=3,
                   round_deadline_s=deadline_s, aggregator=AggregatorRef(name="fedavg"),
                   secure_aggregation={"threshold": 3, "neighbours": 4, "clip": 1.0, "max_count": 100})


def message(type_: str, sender: str, body: Any, round_: int = 1) -> Message:
    return Message(type=type_, id=f"{sender}-{type_}-{time.monotonic_ns()}", ts=time.time(), sender=sender,
                   role="node", job="j1", round=round_, body=body)


class FakeMessenger:
    """Hands each published stage state to the live sites; records what the aggregator sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []
        self.sites: dict[str, SiteRound] = {}
        self.transport = SimpleNamespace(settings=TransportSettings())

    def send(self, topic: str, type_: str, body: Any, **_: Any) -> str:
        self.sent.append((topic, type_, body))
        if type_ == "secagg_state":
            state = SecAggState.model_validate(body.model_dump())
            for site in list(self.sites.values()):
                site.on_state(state)
        return "id"

    def knows_key(self, name: str) -> bool:
        return True


class FakeService:
    def __init__(self, root: Path) -> None:
        self.name, self.messenger, self.checkpoints = "agg", FakeMessenger(), Checkpoints(root)

    def eligible(self, spec: JobSpec) -> list[str]:
        return list(SITES)

    def declared_samples(self, node: str, spec: JobSpec) -> int:
        return 100

    def model_readers(self, spec: JobSpec) -> list[str]:
        return [spec.owner, *SITES]


def runner_with_sites(tmp_path: Path, job: JobSpec, live: list[str]):
    torch.manual_seed(0)
    ref = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    trained = {s: {k: v + 0.1 * torch.randn_like(v) for k, v in ref.items()} for s in SITES}
    runner = JobRunner(job, FakeService(tmp_path))  # type: ignore[arg-type]

    def sender(name: str):
        return lambda topic, type_, body: runner.events.put(_Event("secagg", node=name, message=message(type_, name, body)))

    for s in live:
        runner.service.messenger.sites[s] = SiteRound(job, 1, s, ref, trained[s], COUNTS[s], send=sender(s))
    return runner, ref, trained


def test_the_secure_sum_is_folded_as_one_update_and_a_plain_update_never(tmp_path):
    runner, ref, trained = runner_with_sites(tmp_path, spec(), SITES)
    rogue = Update(round=1, params={k: torch.full_like(v, 1e3) for k, v in ref.items()}, n_samples=100)
    runner.events.put(_Event("update", node="a", message=message("update", "a", rogue)))
    new, summary = runner._round(1, get_rule("fedavg", {}), ref, [])
    total = sum(COUNTS.values())
    for k in ref:
        assert torch.allclose(new[k], sum(COUNTS[s] * trained[s][k] for s in SITES) / total, atol=1e-6)
    assert summary.notes["secure_aggregation"] == {"included": SITES, "dropped": [], "total_count": total}
    assert [r.node for r in summary.reports] == ["secagg"] and summary.reports[0].n_samples == total
    states = [b for t, ty, b in runner.service.messenger.sent if ty == "secagg_state"]
    assert states[-1].stage == "done" and all(t == topics.secagg("r", "j1") for t, ty, _ in runner.service.messenger.sent
                                               if ty == "secagg_state")


def test_a_round_losing_more_than_n_minus_t_sites_fails_with_the_reason(tmp_path):
    runner, ref, _ = runner_with_sites(tmp_path, spec(deadline_s=2.0), SITES[:2])  # 3 of 5 never answer
    t0 = time.monotonic()
    with pytest.raises(JobFailure, match="2 sites survived the keys stage, at least 4 needed"):
        runner._round(1, get_rule("fedavg", {}), ref, [])
    assert time.monotonic() - t0 < 3.0  # the keys stage's deadline (20 % of 2 s), not a hang
