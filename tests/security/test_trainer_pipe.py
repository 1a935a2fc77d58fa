"""Issue 17, attack 1: the training child's answers are hostile input to the node process.

An approved plan runs in the child, next to the child's end of the pipe to the node (its fd
is in argv). It must not be able to run code in the unconfined node (which holds the site's
key) by writing a crafted pickle there, nor slip wrong shapes, NaN or an inflated sample count
past the node through the proper channel. Each attempt fails its round with a reason, and
the node's Trainer goes on serving the next job.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.messages import PlanRef
from common.training.loader import source_sha256
from node.trainer import TrainingFailed
from tests.security.conftest import plan_task, write_npz

ATTACKS = '''
import os, pickle, socket, struct, sys, time
import numpy as np
import torch
from common.training.zoo import MLPPlan


def _fd():
    return int(sys.argv[sys.argv.index("--fd") + 1])


class Boom:
    """Unpickling this creates a file: it runs wherever the pickle is loaded."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class PickleBomb(MLPPlan):
    """Writes a pickle to the node's end of the pipe, framed as multiprocessing frames it."""
    def training_step(self, model, x, y):
        data = pickle.dumps({"ok": False, "error": "pickled", "boom": Boom(self.training_args["target"])})
        os.write(_fd(), struct.pack("!i", len(data)) + data)
        time.sleep(3600)


def _send(answer):
    """Through the node's own protocol (framed msgpack; the pickled pipe before it)."""
    try:
        from common.frames import send_frame
    except ImportError:
        data = pickle.dumps(answer)
        os.write(_fd(), struct.pack("!i", len(data)) + data)
    else:
        send_frame(socket.socket(fileno=os.dup(_fd())), answer)
    time.sleep(3600)


class Forge(MLPPlan):
    """A well-formed answer from the model as sent, with the fields in `forge` replaced."""
    def training_step(self, model, x, y):
        answer = {"ok": True, "n_samples": len(x), "steps": 1, "timings": {"train_s": 0.1},
                  "metrics": {"train_loss": 1.0}, "extra": {}, "local_state": {},
                  "params": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}}
        for key, value in self.training_args["forge"].items():
            if key in ("params", "params_f64"):
                dtype = np.float64 if key == "params_f64" else np.float32
                answer["params"].update({k: np.asarray(v, dtype=dtype) for k, v in value.items()})
            else:
                answer[key] = value
        _send(answer)


class NaNWeights(MLPPlan):
    """Trains, but poisons a weight with NaN."""
    def training_step(self, model, x, y):
        loss = super().training_step(model, x, y)
        with torch.no_grad():
            model.net[0].weight[0, 0] = float("nan")
        return loss


class Reshape(MLPPlan):
    """Trains, but returns a first layer of another shape (run it for one batch)."""
    def training_step(self, model, x, y):
        loss = super().training_step(model, x, y)
        model.net[0].weight = torch.nn.Parameter(torch.zeros(8, 5))
        return loss
'''


def _ref(name: str) -> PlanRef:
    return PlanRef(source=ATTACKS, sha256=source_sha256(ATTACKS), class_name=name)


def _next_job_trains(trainer, tmp_path, job: str) -> None:
    result = trainer.run(plan_task(job, write_npz(tmp_path / "d.npz"), PlanRef(zoo="mlp")), timeout_s=60)
    assert result["n_samples"] == 32 and math.isfinite(result["metrics"]["train_loss"])


def test_a_pickle_written_to_the_pipe_runs_nothing_in_the_node(trainer, tmp_path):
    target = tmp_path / "outside-the-sandbox" / "pwned"
    target.parent.mkdir()
    task = plan_task("bomb", write_npz(tmp_path / "d.npz"), _ref("PickleBomb"), target=str(target))
    with pytest.raises(TrainingFailed) as info:
        trainer.run(task, timeout_s=30)
    assert not target.exists(), "the child's pickle ran code in the node process"
    assert "protocol" in str(info.value), str(info.value)
    _next_job_trains(trainer, tmp_path, "after-bomb")


FORGED = {
    "inflated sample count": ({"n_samples": 10**12}, "n_samples"),
    "zero samples": ({"n_samples": 0}, "n_samples"),
    "sample count as text": ({"n_samples": "32"}, "n_samples"),
    "NaN metric": ({"metrics": {"train_loss": float("nan")}}, "train_loss"),
    "odd metric name": ({"metrics": {"train_loss": 1.0, "x\n" * 200: 1.0}}, "metric"),
    "unknown parameter": ({"params": {"net.9.weight": [[1.0]]}}, "net.9.weight"),
    "wrong shape, forged": ({"params": {"net.0.weight": [[1.0]]}}, "net.0.weight"),
    "wrong dtype": ({"params_f64": {"net.0.weight": [[0.0] * 4] * 8}}, "net.0.weight"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_answer_is_refused_with_a_reason(trainer, tmp_path, case):
    forge, reason = FORGED[case]
    task = plan_task("forge-" + case.replace(" ", "-"), write_npz(tmp_path / "d.npz"), _ref("Forge"), forge=forge)
    with pytest.raises(TrainingFailed, match="refused") as info:
        trainer.run(task, timeout_s=30)
    assert reason in str(info.value), str(info.value)
    _next_job_trains(trainer, tmp_path, "after-forge-" + case.replace(" ", "-"))


@pytest.mark.parametrize(("plan", "reason"), [("NaNWeights", "not finite"), ("Reshape", "shape")])
def test_trained_params_that_do_not_fit_the_sent_model_are_refused(trainer, tmp_path, plan, reason):
    task = plan_task(f"bad-{plan}", write_npz(tmp_path / "d.npz"), _ref(plan), max_batches=1)
    with pytest.raises(TrainingFailed, match="refused") as info:
        trainer.run(task, timeout_s=30)
    assert reason in str(info.value) and "net.0.weight" in str(info.value), str(info.value)
    _next_job_trains(trainer, tmp_path, f"after-{plan}")


def test_a_normal_answer_passes_the_checks_unchanged(trainer, tmp_path):
    task = plan_task("normal", write_npz(tmp_path / "d.npz"), PlanRef(zoo="mlp"))
    result = trainer.run(task, timeout_s=60)
    assert set(result["params"]) == set(task["params"])
    for name, value in result["params"].items():
        assert isinstance(value, torch.Tensor) and value.shape == task["params"][name].shape
        assert value.dtype == task["params"][name].dtype
