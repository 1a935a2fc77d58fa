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


def write_npz(path, n: int = 32, seed: int = 0):
    """A small classification dataset (4 features, 3 classes) for Trainer-level attacks."""
    import numpy as np

    if not path.exists():
        rng = np.random.default_rng(seed)
        np.savez(path, x=rng.normal(size=(n, 4)).astype(np.float32), y=rng.integers(0, 3, n))
    return path


def plan_task(job: str, dataset, plan, round_: int = 1, **targs) -> dict:
    """One round of `plan` for `job` on the npz file `dataset`, as the node hands it to its Trainer."""
    import torch

    from common.training.zoo import MLP

    torch.manual_seed(0)
    params = MLP(in_features=4, hidden=[8], n_classes=3).state_dict()
    return {"job": job, "round": round_, "plan": plan.model_dump(),
            "model_args": {"in_features": 4, "hidden": [8], "n_classes": 3},
            "training_args": {"epochs": 1, "batch_size": 16, "lr": 0.1, **targs},
            "dataset": {"type": "npz", "path": str(dataset)}, "params": params}


@pytest.fixture(scope="session")
def host_template(tmp_path_factory):
    """The host's shared training template (`fbm-node template`), for the whole session: its
    runtime folder (a Trainer's `template_dir`)."""
    import signal

    from node.shared_template import start_template

    runtime = tmp_path_factory.mktemp("host-template") / "run"
    proc = start_template(runtime)
    yield runtime
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


@pytest.fixture(scope="module", params=["own-template", "shared-template"])
def template_dir(request):
    """Each Trainer-level attack runs against a node's own template and against the host's."""
    return request.getfixturevalue("host_template") if request.param == "shared-template" else None


@pytest.fixture(scope="module")
def trainer(template_dir):
    """A node's training-process pool for tests that drive plans without a federation."""
    from node.sandbox import SandboxPolicy
    from node.trainer import Trainer

    t = Trainer(threads=1, policy=SandboxPolicy(memory_mb=2048), template_dir=template_dir)
    t.start()
    yield t
    t.stop()
