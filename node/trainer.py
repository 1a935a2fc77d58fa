"""The parent side of the warm training child: start it confined, hand it tasks, survive its crashes."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from node.sandbox import SandboxPolicy, child_environment, python_read_paths
from node.worker import to_arrays, to_tensors


class TrainingFailed(RuntimeError):
    """A round could not be trained; the message says why (plan error, crash, timeout, memory)."""


def dataset_read_paths(spec: dict[str, Any]) -> list[str]:
    """The files a dataset spec needs to be readable in the sandbox."""
    paths = [spec["path"]]
    for extra in (spec.get("labels"), spec.get("labels_found")):
        if extra:
            paths.append(extra)
    return [str(Path(p).resolve()) for p in paths]


class Trainer:
    """One warm child process (torch imported once) reused across rounds and jobs.

    The child is a fresh interpreter (`python -m node.worker`) with an allow-listed
    environment, confined by `node.sandbox` before any plan runs; it can read only the
    datasets it was started for, so a task on another dataset restarts it with that one added.
    """

    def __init__(self, threads: int = 1, policy: SandboxPolicy | None = None,
                 secret_dirs: list[Path] | None = None, start_timeout_s: float = 120.0) -> None:
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        base = policy or SandboxPolicy()
        self.policy = base.with_read_paths(python_read_paths(list(secret_dirs or [])))
        self.log = structlog.get_logger("trainer")
        self.sandbox: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._scratch: str | None = None
        self._closing = False

    def start(self) -> None:
        self._scratch = tempfile.mkdtemp(prefix="fbm-train-")
        policy = dataclasses.replace(self.policy, scratch=self._scratch)
        parent, child = mp.Pipe()
        fd = child.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.worker", "--fd", str(fd)],
            pass_fds=(fd,), env=child_environment(self.threads, self._scratch), cwd=self._scratch,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        parent.send({"threads": self.threads, "policy": dataclasses.asdict(policy)})
        if not parent.poll(self.start_timeout_s):
            proc.kill()
            raise TrainingFailed("the training process did not start in time")
        try:
            hello = parent.recv()
        except (EOFError, OSError) as exc:
            proc.wait(timeout=5)
            raise TrainingFailed(f"the training process failed to start (exit code {proc.returncode})") from exc
        if self._closing:  # the node began stopping while we started: do not leave a child behind
            proc.kill()
            proc.wait(timeout=5)
            raise TrainingFailed("the node is stopping")
        self._proc, self._conn = proc, parent
        self.sandbox = hello.get("sandbox", {})
        for problem in self.sandbox.get("problems", []):
            self.log.warning("sandbox_degraded", problem=problem)
        self.log.info("training_process_ready", pid=proc.pid, landlock_abi=self.sandbox.get("landlock_abi"),
                      limits=self.sandbox.get("limits"))

    def begin_close(self) -> None:
        """The node is stopping: a child that dies now is not restarted."""
        self._closing = True

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _restart(self) -> None:
        if self._closing:
            raise TrainingFailed("the node is stopping")
        self.stop()
        self.start()

    def allow_datasets(self, datasets: list[dict[str, Any]]) -> list[str]:
        """Grant read access to these datasets from the next (re)start of the child on; the
        paths that were not readable yet."""
        paths = [p for d in datasets for p in dataset_read_paths(d) if not self.policy.allows_reading(p)]
        if paths:
            self.policy = self.policy.with_read_paths(paths)
        return paths

    def _allow(self, dataset: dict[str, Any] | None) -> None:
        """Restart the child with read access to a dataset it was not started for."""
        added = self.allow_datasets([dataset]) if dataset is not None else []
        if added and self._proc is not None:
            self.log.info("training_process_widened", datasets=added)
            self._restart()

    def preload(self, dataset: dict[str, Any], timeout_s: float = 600.0) -> None:
        """Load a dataset into the child's cache now, so the first round does not pay for it."""
        self.run({"op": "preload", "dataset": dataset}, timeout_s)

    def run(self, task: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Train one round in the child; TrainingFailed on a plan error, crash, timeout or memory."""
        self._allow(task.get("dataset"))
        if not self._alive():
            self._restart()
        assert self._conn is not None and self._proc is not None
        for key in ("params", "extra"):
            if key in task:
                task = {**task, key: to_arrays(task[key])}
        try:
            self._conn.send(task)
        except (BrokenPipeError, OSError):
            self._restart()
            self._conn.send(task)
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if not self._alive():
                self._died()
            if time.monotonic() > deadline:
                self._restart()
                raise TrainingFailed(f"training took longer than {timeout_s:.0f}s and was stopped")
        try:
            answer = self._conn.recv()
        except (EOFError, OSError):
            self._died()
        if not answer.get("ok"):
            self.log.warning("plan_failed", traceback=answer.get("traceback"))
            raise TrainingFailed(answer.get("error", "unknown error"))
        for key in ("params", "extra"):
            if key in answer:
                answer[key] = to_tensors(answer[key])
        return answer

    def _died(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        code = self._proc.returncode
        self._restart()
        why = " (killed: out of memory?)" if code == -9 else ""
        raise TrainingFailed(f"the training process died (exit code {code}){why}; it was restarted")

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._proc, self._conn, self._scratch = None, None, None
