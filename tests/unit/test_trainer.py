"""The warm training child: trains, survives a plan that raises or kills it, stays warm."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.messages import PlanRef
from common.training.loader import source_sha256
from common.training.zoo import MLP
from node.trainer import Trainer, TrainingFailed

CRASHING_PLAN = '''
import os
from common.training.zoo import MLPPlan

class Crash(MLPPlan):
    def training_step(self, model, x, y):
        os._exit(3)

class Raise(MLPPlan):
    def training_step(self, model, x, y):
        raise RuntimeError("bug in the plan")
'''


@pytest.fixture(scope="module")
def trainer():
    t = Trainer(threads=1)
    t.start()
    yield t
    t.stop()


def _task(tmp_path, plan: PlanRef, **targs):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(64, 4)).astype(np.float32), y=rng.integers(0, 3, 64))
    torch.manual_seed(0)
    params = MLP(in_features=4, hidden=[8], n_classes=3).state_dict()
    return {"job": "j", "round": 1, "plan": plan.model_dump(), "model_args": {"in_features": 4, "hidden": [8], "n_classes": 3},
            "training_args": {"epochs": 2, "lr": 0.1, "batch_size": 16, **targs},
            "dataset": {"type": "npz", "path": str(path)}, "params": params}


def test_trains_and_is_deterministic(trainer, tmp_path):
    task = _task(tmp_path, PlanRef(zoo="mlp"))
    a = trainer.run(task, timeout_s=60)
    b = trainer.run(task, timeout_s=60)
    assert a["n_samples"] == 64 and a["steps"] == 8
    assert not torch.equal(a["params"]["net.0.weight"], task["params"]["net.0.weight"])
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert b["timings"]["load_s"] == 0.0  # the dataset stayed loaded in the warm child


def _plan(name):
    return PlanRef(source=CRASHING_PLAN, sha256=source_sha256(CRASHING_PLAN), class_name=name)


def test_a_plan_that_raises_fails_the_round_only(trainer, tmp_path):
    with pytest.raises(TrainingFailed, match="bug in the plan"):
        trainer.run(_task(tmp_path, _plan("Raise")), timeout_s=60)
    assert trainer.run(_task(tmp_path, PlanRef(zoo="mlp")), timeout_s=60)["n_samples"] == 64


def test_a_plan_that_kills_the_child_is_reported_and_the_child_restarted(trainer, tmp_path):
    with pytest.raises(TrainingFailed, match="died"):
        trainer.run(_task(tmp_path, _plan("Crash")), timeout_s=60)
    assert trainer.run(_task(tmp_path, PlanRef(zoo="mlp")), timeout_s=60)["n_samples"] == 64


def test_one_process_per_job_bounded_least_recently_used_first(tmp_path):
    trainer = Trainer(threads=1, max_processes=2)
    trainer.start()
    try:
        pids = {}
        for job in ("j1", "j2", "j1", "j3"):  # j3 needs a place: j2 is the least recently used
            result = trainer.run({**_task(tmp_path, PlanRef(zoo="mlp")), "job": job}, timeout_s=60)
            assert result["n_samples"] == 64
            pids.setdefault(job, set()).add(trainer.pid(job))
            assert trainer.live_processes() <= 2
        assert len(pids["j1"]) == 1  # j1's two rounds ran in one warm process
        assert trainer.jobs() == ["j1", "j3"]
        trainer.end_job("j1")
        assert trainer.jobs() == ["j3"]
    finally:
        trainer.stop()
    assert trainer.live_processes() == 0


def test_a_job_prepared_at_acceptance_trains_in_that_process_and_prepare_never_evicts(tmp_path):
    trainer = Trainer(threads=1, max_processes=2)
    trainer.start()
    try:
        task = _task(tmp_path, PlanRef(zoo="mlp"))
        assert trainer.prepare("j", task["dataset"])  # forked and confined before any model came
        pid = trainer.pid("j")
        assert pid is not None and trainer.prepare("j", task["dataset"]) and trainer.pid("j") == pid
        assert trainer.run(task, timeout_s=60)["n_samples"] == 64
        assert trainer.pid("j") == pid  # the first round did not fork again
        trainer.run({**task, "job": "k"}, timeout_s=60)
        assert not trainer.prepare("l", task["dataset"])  # full: a job that has not trained evicts nobody
        assert trainer.jobs() == ["j", "k"] and trainer.pid("l") is None
    finally:
        trainer.stop()


def _slice_ns(pid: int) -> int:
    text = Path(f"/proc/{pid}/sched").read_text()
    line = next(x for x in text.splitlines() if x.startswith("se.slice"))
    return int(line.rpartition(":")[2])


def test_a_training_process_runs_with_long_time_slices_and_its_node_does_not(trainer, tmp_path):
    """Training is batch work (node/sched.py): its slice is 20 ms, so 25 rounds sharing 2 cores
    are not cut into cache-cold 1.4 ms pieces; the node keeps the default and preempts it."""
    from node import sched

    trainer.run(_task(tmp_path, PlanRef(zoo="mlp")), timeout_s=60)
    child = trainer.pid("j")
    assert child is not None and _slice_ns(child) == sched.TRAINING_SLICE_NS
    assert _slice_ns(os.getpid()) < sched.TRAINING_SLICE_NS


def _spare_pid(trainer: Trainer) -> int:
    spare = trainer._spare
    assert spare is not None and spare.alive(), "no live spare"
    return spare.pid


def test_a_spare_forked_while_idle_serves_the_next_job_and_is_replaced_when_the_job_ends(tmp_path):
    trainer = Trainer(threads=1, max_processes=2)
    trainer.start()
    try:
        task = _task(tmp_path, PlanRef(zoo="mlp"))
        first = _spare_pid(trainer)  # forked at start, before any job
        assert trainer.prepare("j", task["dataset"]) and trainer.pid("j") == first
        assert trainer._spare is None  # taken: a spare serves one job only
        assert trainer.run(task, timeout_s=60)["n_samples"] == 64
        trainer.end_job("j")
        second = _spare_pid(trainer)
        assert second != first
        os.kill(second, signal.SIGKILL)  # a spare that died while waiting is not handed out
        for _ in range(100):
            if not trainer._spare.alive():
                break
            time.sleep(0.02)
        assert trainer.run({**task, "job": "k"}, timeout_s=60)["n_samples"] == 64
        assert trainer.pid("k") not in (None, first, second)
    finally:
        trainer.stop()
    assert trainer.live_processes() == 0 and trainer._spare is None
