"""The parent side of the warm training child: start it, hand it tasks, survive its crashes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from typing import Any

import structlog

from node.worker import serve, to_arrays, to_tensors


class TrainingFailed(RuntimeError):
    """A round could not be trained; the message says why (plan error, crash, timeout)."""


class Trainer:
    """One warm child process (spawned, torch imported once) reused across rounds and jobs."""

    def __init__(self, threads: int = 1, start_timeout_s: float = 120.0) -> None:
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.log = structlog.get_logger("trainer")
        self._ctx = mp.get_context("spawn")
        self._proc: mp.process.BaseProcess | None = None
        self._conn = None
        self._closing = False

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=serve, args=(child, self.threads), name="fbm-train", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout_s):
            proc.kill()
            raise TrainingFailed("the training process did not start in time")
        parent.recv()
        self._proc, self._conn = proc, parent
        self.log.info("training_process_ready", pid=proc.pid)

    def begin_close(self) -> None:
        """The node is stopping: a child that dies now is not restarted."""
        self._closing = True

    def _restart(self) -> None:
        if self._closing:
            raise TrainingFailed("the node is stopping")
        self.stop()
        self.start()

    def preload(self, dataset: dict[str, Any], timeout_s: float = 600.0) -> None:
        """Load a dataset into the child's cache now, so the first round does not pay for it."""
        self.run({"op": "preload", "dataset": dataset}, timeout_s)

    def run(self, task: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Train one round in the child; TrainingFailed on a plan error, crash or timeout."""
        if self._proc is None or not self._proc.is_alive():
            self._restart()
        assert self._conn is not None and self._proc is not None
        if "params" in task:
            task = {**task, "params": to_arrays(task["params"])}
        try:
            self._conn.send(task)
        except (BrokenPipeError, OSError):
            self._restart()
            self._conn.send(task)
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if not self._proc.is_alive():
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
        if "params" in answer:
            answer["params"] = to_tensors(answer["params"])
        return answer

    def _died(self) -> None:
        assert self._proc is not None
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        self._restart()
        raise TrainingFailed(f"the training process died (exit code {code}); it was restarted")

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._proc, self._conn = None, None
