"""The host's shared training template (`fbm-node template`): several nodes of one user fork
their training processes from one template. What must hold, as with a node's own template:
each process gets exactly the policy its node asked for, its death and exit status reach that
node, and no node (nor a training process) can use the template for more than its own request.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time

import pytest

from common.frames import FrameError, recv_frame, send_frame
from common.messages import PlanRef
from common.training.loader import source_sha256
from node.sandbox import SandboxPolicy, landlock_abi, python_read_paths
from node.shared_template import SOCKET_FILE, TOKEN_FILE, SharedTemplate, start_template
from node.trainer import Trainer, TrainingFailed
from tests.conftest import wait_until
from tests.security.conftest import plan_task, write_npz

PLANS = '''
import os, socket
from common.training.zoo import MLPPlan


def attempt(fn):
    try:
        return "GOT " + repr(fn())[:80]
    except Exception as exc:
        return "DENIED " + type(exc).__name__


class Probe(MLPPlan):
    """Reports what it holds and reaches: its sockets, another dataset, the template's token."""
    def training_step(self, model, x, y):
        fds = os.listdir("/proc/self/fd")
        sockets = sum(os.readlink("/proc/self/fd/" + fd).startswith("socket:") for fd in fds if fd.isdigit()
                      and os.path.exists("/proc/self/fd/" + fd))
        seen = {"sockets": sockets, "other": attempt(lambda: open(self.training_args["other"], "rb").read()),
                "token": attempt(lambda: open(self.training_args["token"]).read())}
        raise RuntimeError("REPORT " + repr(seen))


class Slow(MLPPlan):
    def training_step(self, model, x, y):
        import time
        time.sleep(5)
        return super().training_step(model, x, y)


class Exit3(MLPPlan):
    def training_step(self, model, x, y):
        os._exit(3)
'''


def _ref(name: str) -> PlanRef:
    return PlanRef(source=PLANS, sha256=source_sha256(PLANS), class_name=name)


@pytest.fixture
def own_template(tmp_path):
    """A template of this test's own (it is killed by some tests); its runtime folder."""
    runtime = tmp_path / "run"
    proc = start_template(runtime)
    yield runtime, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def _trainer(runtime) -> Trainer:
    t = Trainer(threads=1, policy=SandboxPolicy(memory_mb=2048), template_dir=runtime)
    t.start()
    return t


def _report(trainer: Trainer, task: dict) -> dict:
    with pytest.raises(TrainingFailed, match="REPORT") as info:
        trainer.run(task, timeout_s=60)
    return eval(str(info.value).split("REPORT ", 1)[1])  # noqa: S307 - our own test plan's repr of a dict


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock: no filesystem confinement to test")
def test_two_nodes_processes_each_get_their_own_request_only(host_template, tmp_path):
    """Node A's job cannot read node B's dataset, nor the token, and holds one socket: its own
    job's (not the template's listener, nor B's connection, through which it could ask for more)."""
    a, b = write_npz(tmp_path / "a.npz", seed=1), write_npz(tmp_path / "b.npz", seed=2)
    node_a, node_b = _trainer(host_template), _trainer(host_template)
    try:
        assert node_b.run(plan_task("job-b", b, PlanRef(zoo="mlp")), timeout_s=60)["n_samples"] == 32
        seen = _report(node_a, plan_task("job-a", a, _ref("Probe"), other=str(b), token=str(host_template / TOKEN_FILE)))
        assert node_a.sandbox["landlock_abi"] >= 1 and not node_a.sandbox["problems"]
    finally:
        node_a.stop()
        node_b.stop()
    assert seen["other"] == "DENIED PermissionError", seen
    assert seen["token"] == "DENIED PermissionError", seen
    assert seen["sockets"] == 1, seen


def test_a_childs_exit_status_reaches_its_node(host_template, tmp_path):
    trainer = _trainer(host_template)
    try:
        with pytest.raises(TrainingFailed, match=r"exit code 3\)"):
            trainer.run(plan_task("exits", write_npz(tmp_path / "d.npz"), _ref("Exit3")), timeout_s=60)
        assert trainer.run(plan_task("exits", tmp_path / "d.npz", PlanRef(zoo="mlp")), timeout_s=60)["n_samples"] == 32
    finally:
        trainer.stop()


def test_the_templates_death_is_detected_reported_and_survived(own_template, tmp_path):
    """The template dies mid-round: the round fails saying so, its child is gone with it, and
    once a template is back the next round connects to it and trains."""
    runtime, proc = own_template
    data = write_npz(tmp_path / "d.npz")
    trainer = _trainer(runtime)
    failed: list[str] = []

    def slow_round() -> None:
        try:
            trainer.run(plan_task("j", data, _ref("Slow")), timeout_s=60)
        except TrainingFailed as exc:
            failed.append(str(exc))

    try:
        thread = threading.Thread(target=slow_round)
        thread.start()
        assert wait_until(lambda: trainer.pid("j") is not None, 60)
        child = trainer.pid("j")
        time.sleep(1)
        proc.kill()
        thread.join(30)
        assert failed and "template is gone" in failed[0], failed
        assert wait_until(lambda: _ended(child), 10), "the child outlived its template"
        trainer.start_timeout_s = 2
        with pytest.raises(TrainingFailed, match="no training template"):
            trainer.run(plan_task("j", data, PlanRef(zoo="mlp"), round_=2), timeout_s=60)
        trainer.start_timeout_s = 120
        proc2 = start_template(runtime)  # a new template: the next round connects to it
        try:
            assert trainer.run(plan_task("j", data, PlanRef(zoo="mlp"), round_=3), timeout_s=120)["n_samples"] == 32
            assert trainer.pid("j") != child
        finally:
            proc2.send_signal(signal.SIGTERM)
            proc2.wait(10)
    finally:
        trainer.stop()


def _ended(pid: int) -> bool:
    """Gone, or a zombie (orphans go to a pid 1 that may not reap them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _hello(runtime, token) -> object:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(runtime / SOCKET_FILE))
        send_frame(sock, {"token": token})
        try:
            return recv_frame(sock, 4096, time.monotonic() + 10, torch_tensors=False)
        except FrameError as exc:
            return str(exc)


def test_a_client_without_the_token_is_refused(host_template):
    SharedTemplate(host_template).wait_warm(120)  # listening
    assert _hello(host_template, "0" * 64) == "the peer closed the connection"
    assert _hello(host_template, (host_template / TOKEN_FILE).read_text())["warm"] is True


def test_a_node_can_kill_only_its_own_children(host_template, tmp_path):
    """B asks the template to kill A's training process and sees nothing of its end; A can."""
    a, b = SharedTemplate(host_template), SharedTemplate(host_template)
    job, child_end = socket.socketpair()
    policy = SandboxPolicy(memory_mb=2048, scratch=str(tmp_path)).with_read_paths(python_read_paths([]))
    request = {"threads": 1, "scratch": str(tmp_path), "policy": dataclasses.asdict(policy)}
    try:
        child = a.fork(child_end, request, 120)
        child_end.close()
        assert recv_frame(job, 1 << 20, time.monotonic() + 60, torch_tensors=False)["ready"] is True
        b.wait_warm(10)
        b.kill(child.pid)
        time.sleep(1)
        assert child.poll() is None and b.exit_code(child.pid) is None
        child.kill()
        assert child.wait(10) == -signal.SIGKILL
    finally:
        a.stop()
        b.stop()
        job.close()


def test_the_runtime_folder_must_be_private(tmp_path):
    from node.training_process import ChildFailed

    shared = tmp_path / "open"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ChildFailed, match="0700"):
        SharedTemplate(shared).wait_warm(1)
