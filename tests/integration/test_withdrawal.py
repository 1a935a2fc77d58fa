"""A job's withdrawal (issue 18): signed, by its owner only, and it leaves nothing of the job
retained on the broker (spec chunks, plan source, initial parameters) but the signed notice."""

from __future__ import annotations

import time

import pytest
import torch
from click.testing import CliRunner

from common import topics
from common.errors import PublishDenied
from researcher import cli as researcher_cli
from researcher.experiment import Experiment, JobError
from tests.conftest import Inbox, bundle, fast_settings, open_transport

pytestmark = pytest.mark.integration

SMALL_CHUNKS = fast_settings(chunk_size=4096)


def _experiment(fed, who: str = "res-1") -> Experiment:
    exp = Experiment(bundle(fed, who), plan="mlp", tags=["nobody-has-this"], model_args={"in_features": 256, "hidden": [64]},
                     mqtt=SMALL_CHUNKS)
    assert sum(t.numel() * 4 for t in exp.initial_params().values()) > 5 * 4096  # the spec is chunked
    return exp


def _retained(fed, clients, owner: str, job: str) -> dict[str, bytes]:
    """What a fresh admin subscriber gets retained under the job's topic (raw, chunks included)."""
    inbox = Inbox()
    admin = open_transport(fed, "admin-1", clients, inbox)
    admin._client.subscribe(topics.job(owner, job) + "/#", qos=1)  # raw: chunk topics are not reassembled here
    admin._client.on_message = lambda c, u, m: inbox((m.topic, bytes(m.payload)))
    time.sleep(1.0)
    return dict(inbox.items)


def test_the_owner_withdraws_and_nothing_of_the_job_stays_retained(federation, clients):
    exp = _experiment(federation)
    job = exp.submit()
    try:
        before = _retained(federation, clients, "res-1", job)
        assert sum(1 for t in before if "/c/" in t) >= 5, sorted(before)
        exp.withdraw("done with it")
        after = _retained(federation, clients, "res-1", job)
    finally:
        exp.close()
    assert list(after) == [topics.job("res-1", job)], sorted(after)  # the notice only: no chunk left
    with pytest.raises(JobError, match="withdrawn by 'res-1'"):
        Experiment.attach(bundle(federation, "res-1"), job, timeout_s=3)
    weights = exp.spec().initial_params["net.0.weight"].numpy().tobytes()
    assert weights[:64] not in after[topics.job("res-1", job)]


def test_another_researcher_can_neither_withdraw_nor_clear_a_job(federation, clients):
    exp = _experiment(federation)
    job = exp.submit()
    try:
        runner = CliRunner()
        for extra in ([], ["--owner", "res-1"]):
            done = runner.invoke(researcher_cli.main, ["withdraw", job, "--bundle", str(federation.ws.bundle_dir("res-2")),
                                                       "--wait", "1", *extra])
            assert done.exit_code == 3 and "not yours" in done.output, done.output
        other = open_transport(federation, "res-2", clients)
        for topic in (topics.job("res-1", job), topics.chunk(topics.job("res-1", job), 0)):
            with pytest.raises(PublishDenied):
                other.publish(topic, b"", retain=True)
        still = _retained(federation, clients, "res-1", job)
        assert sum(1 for t in still if "/c/" in t) >= 5
        assert torch.equal(Experiment.attach(bundle(federation, "res-1"), job).spec().initial_params[
            "net.0.weight"], exp.spec().initial_params["net.0.weight"])
    finally:
        exp.close()
    # its owner, from another process (the CLI attaches: it reads the spec and its chunks back)
    done = CliRunner().invoke(researcher_cli.main, ["withdraw", job, "--bundle", str(federation.ws.bundle_dir("res-1")),
                                                    "--reason", "enough"])
    assert done.exit_code == 0 and "withdrawn" in done.output, done.output
    assert list(_retained(federation, clients, "res-1", job)) == [topics.job("res-1", job)]
