"""A plan is someone else's code: it must not reach the node's key, environment or network,
and a plan that crashes, hangs or allocates without bound fails its round, not the node."""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.messages import PlanRef
from common.training.loader import source_sha256
from common.training.zoo import MLP
from node.sandbox import SandboxPolicy, landlock_abi
from node.trainer import Trainer, TrainingFailed

HOSTILE = '''
import os, socket
from common.training.zoo import MLPPlan

def attempt(fn):
    try:
        return "GOT " + repr(fn())[:80]
    except Exception as exc:
        return "DENIED " + type(exc).__name__

class Snoop(MLPPlan):
    """Reports what it could reach, through the error message (the only channel it has)."""
    def training_step(self, model, x, y):
        key = self.training_args["key_file"]
        parent = os.getppid()
        seen = {
            "key": attempt(lambda: open(key).read()),
            "key_dir": attempt(lambda: os.listdir(os.path.dirname(key))),
            "parent_environ": attempt(lambda: open(f"/proc/{parent}/environ", "rb").read()),
            "parent_mem": attempt(lambda: open(f"/proc/{parent}/mem", "rb").read(1)),
            "tcp": attempt(lambda: socket.create_connection(("127.0.0.1", self.training_args["port"]), timeout=2)),
            "write_outside": attempt(lambda: open(os.path.join(os.path.dirname(key), "dropped"), "w").write("x")),
            "env": sorted(os.environ),
        }
        raise RuntimeError("REPORT " + repr(seen))

class Hog(MLPPlan):
    def training_step(self, model, x, y):
        hoard = []
        while True:
            hoard.append(torch.ones(50_000_000))  # 200 MB a step, never freed

class Hang(MLPPlan):
    def training_step(self, model, x, y):
        import time
        time.sleep(3600)

class Crash(MLPPlan):
    def training_step(self, model, x, y):
        os.kill(os.getpid(), 9)
'''
HOSTILE = HOSTILE.replace("class Hog(MLPPlan):", "import torch\n\nclass Hog(MLPPlan):")


def _ref(name: str) -> PlanRef:
    return PlanRef(source=HOSTILE, sha256=source_sha256(HOSTILE), class_name=name)


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("node-dir")
    (d / "identity.key").write_text("-----BEGIN PRIVATE KEY----- the node's key")
    return d


@pytest.fixture(scope="module")
def trainer(secret_dir, template_dir):
    os.environ["FBM_NODE_TEST_SECRET"] = "do-not-leak"
    t = Trainer(threads=1, policy=SandboxPolicy(memory_mb=2048), secret_dirs=[secret_dir], template_dir=template_dir)
    t.start()
    yield t
    t.stop()
    del os.environ["FBM_NODE_TEST_SECRET"]


def _task(data_dir, plan: PlanRef, **targs):
    path = data_dir / "d.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.normal(size=(32, 4)).astype(np.float32), y=rng.integers(0, 3, 32))
    params = MLP(in_features=4, hidden=[8], n_classes=3).state_dict()
    return {"job": "j", "round": 1, "plan": plan.model_dump(), "model_args": {"in_features": 4, "hidden": [8], "n_classes": 3},
            "training_args": {"epochs": 1, "batch_size": 16, **targs}, "dataset": {"type": "npz", "path": str(path)},
            "params": params}


def _still_trains(trainer, data_dir):
    assert trainer.run(_task(data_dir, PlanRef(zoo="mlp")), timeout_s=60)["n_samples"] == 32


def _report(trainer, data_dir, secret_dir, port) -> dict:
    with pytest.raises(TrainingFailed) as info:
        trainer.run(_task(data_dir, _ref("Snoop"), key_file=str(secret_dir / "identity.key"), port=port), timeout_s=60)
    text = str(info.value)
    assert "REPORT " in text, text
    return eval(text.split("REPORT ", 1)[1])  # noqa: S307 - our own test plan's repr of a dict of str


def test_the_environment_is_an_allow_list(trainer, tmp_path, secret_dir):
    seen = _report(trainer, tmp_path, secret_dir, port=1)
    assert not [k for k in seen["env"] if k.startswith("FBM")]
    assert set(seen["env"]) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "HOME",
                                "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "PYTHONDONTWRITEBYTECODE",
                                "TORCHINDUCTOR_CACHE_DIR"}


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock: no filesystem confinement to test")
def test_a_plan_cannot_read_the_key_the_node_environment_or_write_beside_them(trainer, tmp_path, secret_dir):
    seen = _report(trainer, tmp_path, secret_dir, port=1)
    for what in ("key", "key_dir", "parent_environ", "parent_mem", "write_outside"):
        assert seen[what].startswith("DENIED"), (what, seen[what])
    assert not (secret_dir / "dropped").exists()
    assert trainer.sandbox["landlock_abi"] >= 1 and not trainer.sandbox["problems"]


@pytest.mark.skipif(landlock_abi() < 4, reason="Landlock network rules need ABI 4 (Linux 6.7)")
def test_a_plan_cannot_open_a_tcp_connection(trainer, tmp_path, secret_dir):
    import socket

    server = socket.create_server(("127.0.0.1", 0))  # a listener it would reach without the sandbox
    try:
        seen = _report(trainer, tmp_path, secret_dir, port=server.getsockname()[1])
    finally:
        server.close()
    assert seen["tcp"] == "DENIED PermissionError"


def test_a_plan_that_allocates_without_bound_fails_its_round_only(trainer, tmp_path):
    with pytest.raises(TrainingFailed, match="(?i)memory"):
        trainer.run(_task(tmp_path, _ref("Hog")), timeout_s=120)
    _still_trains(trainer, tmp_path)


def test_a_plan_that_hangs_is_stopped_at_the_time_limit(trainer, tmp_path):
    with pytest.raises(TrainingFailed, match="longer than 3s"):
        trainer.run(_task(tmp_path, _ref("Hang")), timeout_s=3)
    _still_trains(trainer, tmp_path)


def test_a_plan_that_kills_its_process_is_reported_and_the_child_restarted(trainer, tmp_path):
    with pytest.raises(TrainingFailed, match="died"):
        trainer.run(_task(tmp_path, _ref("Crash")), timeout_s=60)
    _still_trains(trainer, tmp_path)
