"""Issue 17, attack 2: one training process must not see every dataset and every job.

A job's process reads only the dataset the job was accepted on, and a plan that patches torch
in its process cannot change what another job's training does.
"""

from __future__ import annotations

import pytest
import torch

from common.messages import PlanRef
from common.training.loader import source_sha256
from node.sandbox import SandboxPolicy, landlock_abi
from node.trainer import Trainer, TrainingFailed
from tests.security.conftest import plan_task, write_npz

SNOOPS = '''
import torch
from common.training.zoo import MLPPlan


class ReadOther(MLPPlan):
    """Reports whether it could read another dataset's file, through its error message."""
    def training_step(self, model, x, y):
        try:
            with open(self.training_args["other"], "rb") as f:
                got = "GOT %d bytes" % len(f.read())
        except Exception as exc:
            got = "DENIED " + type(exc).__name__
        raise RuntimeError("REPORT " + got)


class PatchTorch(MLPPlan):
    """Makes every later SGD step and in-place add a no-op in the process it runs in."""
    def training_step(self, model, x, y):
        torch.optim.SGD.step = lambda self, closure=None: None
        torch.Tensor.add_ = lambda self, *a, **k: self
        return super().training_step(model, x, y)
'''


def _ref(name: str) -> PlanRef:
    return PlanRef(source=SNOOPS, sha256=source_sha256(SNOOPS), class_name=name)


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock: no filesystem confinement to test")
def test_a_job_cannot_read_another_jobs_dataset(trainer, tmp_path):
    a, b = write_npz(tmp_path / "a.npz", seed=1), write_npz(tmp_path / "b.npz", seed=2)
    # job-b trains on b first: the node has granted b to training before job-a's plan runs
    assert trainer.run(plan_task("job-b", b, PlanRef(zoo="mlp")), timeout_s=60)["n_samples"] == 32
    with pytest.raises(TrainingFailed, match="REPORT") as info:
        trainer.run(plan_task("job-a", a, _ref("ReadOther"), other=str(b)), timeout_s=60)
    assert "REPORT DENIED PermissionError" in str(info.value), str(info.value)


def test_a_plan_that_patches_torch_does_not_change_the_next_jobs_training(trainer, tmp_path):
    data = write_npz(tmp_path / "d.npz")
    honest = plan_task("reference", data, PlanRef(zoo="mlp"))
    expected = trainer.run(honest, timeout_s=60)["params"]
    assert not torch.equal(expected["net.0.weight"], honest["params"]["net.0.weight"])  # SGD moved it

    trainer.run(plan_task("patcher", data, _ref("PatchTorch")), timeout_s=60)
    after = trainer.run({**honest, "job": "victim"}, timeout_s=60)["params"]
    for name, value in expected.items():
        assert torch.equal(after[name], value), f"{name} trained differently after another job patched torch"


@pytest.mark.e2e
def test_a_nodes_training_process_serves_one_job_and_ends_with_it(sites):
    """Real nodes: each job gets a process of its own (audited, confined), gone once the job is done."""
    from pathlib import Path

    from common.identity import Identity
    from node.audit import AuditTrail
    from node.db import Database
    from researcher.experiment import Experiment
    from tests.conftest import wait_until

    alice = Identity.load(sites.ws.bundle_dir("alice"))
    trail = AuditTrail(Database(sites.root / "nodes" / "site-1" / "node.db"))
    started = {}
    for _ in range(2):
        exp = Experiment(alice, tags=["fmnist"], rounds=2, quorum=2, round_deadline_s=60,
                         model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                         training_args={"epochs": 1, "lr": 0.05, "batch_size": 50})
        job = exp.submit()
        state = exp.watch(timeout_s=180, progress=False)
        exp.close()
        assert state.status == "done", state.reason
        events = [e for e in trail.entries(job) if e["event"] == "training_process_started"]
        assert len(events) == 1, events  # one process for both rounds of the job
        started[job] = events[0]["detail"]
    for job, detail in started.items():
        if landlock_abi():
            assert detail["sandbox"]["landlock_abi"] >= 1 and not detail["sandbox"]["problems"]
        assert wait_until(lambda pid=detail["pid"]: not Path(f"/proc/{pid}").exists(), 30), f"{job}'s process lives on"
    assert len({d["pid"] for d in started.values()}) == 2


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock: no filesystem confinement to test")
def test_every_thread_of_a_jobs_process_is_confined(tmp_path):
    """Landlock binds the thread that asks and the threads it starts: a child that started
    torch's worker threads before confining itself would leave them unconfined."""
    trainer = Trainer(threads=2, policy=SandboxPolicy(memory_mb=2048))
    trainer.start()
    try:
        trainer.run(plan_task("threads", write_npz(tmp_path / "d.npz"), PlanRef(zoo="mlp")), timeout_s=60)
        assert trainer.sandbox["landlock_abi"] >= 1 and trainer.sandbox["problems"] == []
    finally:
        trainer.stop()
