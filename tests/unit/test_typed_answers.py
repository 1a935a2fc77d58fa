"""Typed job answers (`JobAnswer`, `TrainFailed`) and training args (`TrainingArgs`), issue 16."""

from __future__ import annotations

import pytest

from common.messages import JobAnswer, Reply, TrainFailed
from common.training.args import ALGORITHM_OF_RULE, TrainingArgs, TrainingArgsError


@pytest.mark.parametrize(("answer", "ok", "data"), [
    (JobAnswer(job="j", status="accepted", dataset="ds", n_samples=10), True,
     {"job": "j", "status": "accepted", "dataset": "ds", "n_samples": 10}),
    (JobAnswer(job="j", status="pending", plan="abc"), False, {"job": "j", "status": "pending", "plan": "abc"}),
    (JobAnswer(job="j", status="declined"), False, {"job": "j", "status": "declined"}),
])
def test_job_answers_on_the_wire_and_back(answer, ok, data):
    reply = answer.reply(in_reply_to="m1", error="" if ok else "why")
    assert (reply.command, reply.ok, reply.data, reply.in_reply_to) == ("job", ok, data, "m1")
    assert JobAnswer.of(reply) == answer and TrainFailed.of(reply) is None


@pytest.mark.parametrize(("reply", "expected"), [
    (Reply(command="job", ok=False, error="job refused: bad", data={"job": "j"}), JobAnswer(job="j", status="declined")),
    (Reply(command="job", ok=True, data={}), JobAnswer(job="env", status="accepted")),
    (Reply(command="ping", data={"pong": True}), None),
])
def test_job_answers_without_a_status_or_job(reply, expected):
    assert JobAnswer.of(reply, "env") == expected


def test_train_failed():
    reply = TrainFailed(job="j", round=3).reply("out of memory")
    assert (reply.command, reply.ok, reply.error, reply.data) == ("train", False, "out of memory", {"job": "j", "round": 3})
    assert TrainFailed.of(reply) == TrainFailed(job="j", round=3) and JobAnswer.of(reply) is None
    assert TrainFailed.of(Reply(command="train", ok=True)) is None


def test_training_args_defaults_and_plan_keys():
    args = TrainingArgs.of({"epochs": 2, "augment": True})
    assert (args.epochs, args.batch_size, args.lr, args.seed, args.algorithm, args.max_batches) == (2, 64, 0.01, 0, "sgd", None)
    assert args.model_extra == {"augment": True}  # a plan's own keys pass through


@pytest.mark.parametrize(("raw", "where"), [
    ({"epochs": "many"}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"report_norms": "fc1.weight"}, "report_norms"),
])
def test_training_args_refused_with_the_key(raw, where):
    with pytest.raises(TrainingArgsError, match=f"invalid training_args.{where}"):
        TrainingArgs.of(raw)


def test_built_in_rules_take_their_local_algorithm_from_the_one_table():
    from aggregators.rules.base import _RULES

    for name, algorithm in ALGORITHM_OF_RULE.items():
        assert _RULES[name].local_algorithm == algorithm
    assert _RULES["fedavg"].local_algorithm == "sgd"
