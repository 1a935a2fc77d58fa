"""The researcher's job description: what `Experiment.spec()` puts on the wire (no broker needed)."""

from __future__ import annotations

import pytest
import torch

from broker.workspace import Workspace
from common.training.loader import PlanError, source_sha256
from common.training.zoo import MLP
from researcher.experiment import Experiment, plan_ref


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("fed"))
    ws.init("unit", port=1)
    return ws.enroll("alice", "researcher")


def test_spec_carries_every_setting_and_seeded_initial_params(bundle):
    exp = Experiment(bundle, tags=["t"], plan="mlp", model_args={"hidden": [4]}, rounds=7, quorum=2,
                     stragglers="quorum", round_deadline_s=30, seed=5, training_args={"lr": 0.1})
    spec = exp.spec()
    assert (spec.rounds, spec.quorum, spec.stragglers, spec.round_deadline_s) == (7, 2, "quorum", 30)
    assert spec.owner == "alice" and spec.job_id.startswith("alice-") and spec.training_args["seed"] == 5
    torch.manual_seed(5)
    expected = MLP(hidden=[4]).state_dict()
    assert all(torch.equal(spec.initial_params[k], expected[k]) for k in expected)


def test_plan_references(tmp_path):
    source = "from common.training.zoo import MLPPlan\n\nclass Mine(MLPPlan):\n    pass\n"
    path = tmp_path / "mine.py"
    path.write_text(source)
    ref = plan_ref(path, "Mine")
    assert ref.sha256 == source_sha256(source) and ref.class_name == "Mine"
    with pytest.raises(PlanError, match="name the TrainingPlan class"):
        plan_ref(path)
    with pytest.raises(PlanError, match="unknown zoo plan"):
        plan_ref("nope")


def test_bad_settings_are_refused(bundle):
    with pytest.raises(ValueError):
        Experiment(bundle, tags=["t"], stragglers="sometimes").spec()
    with pytest.raises(ValueError):
        Experiment(bundle, tags=[], rounds=1).spec()


def test_poll_returns_once_what_came_is_applied(bundle):
    """`poll(timeout)` waits for the first message only: a job that ends is seen when it ends, not
    at the end of the wait (`watch` polls 0.5 s at a time: a job's wall time was rounded up to it)."""
    import queue
    import threading
    import time

    exp = Experiment(bundle, tags=["t"], rounds=1)
    exp._messenger, exp._events = object(), queue.Queue()  # no broker: the events come from here
    applied: list[str] = []
    exp._apply = applied.append
    exp._events.put("a")
    threading.Timer(0.05, exp._events.put, ("b",)).start()
    start = time.monotonic()
    exp.poll(5.0)  # "a" is there: applied, and no wait for more
    assert applied == ["a"] and time.monotonic() - start < 0.05
    exp.poll(5.0)  # "b" comes after 0.05 s
    assert applied == ["a", "b"] and time.monotonic() - start < 1.0
    start = time.monotonic()
    exp.poll(0.2)  # nothing comes: the whole wait
    assert applied == ["a", "b"] and time.monotonic() - start >= 0.2
