"""The parent's handle on one training child: spawn it, assign it a job, trade frames with it.

A child is spawned before its job is known (it imports torch meanwhile), then
assigned one job with a sandbox policy that names that job's dataset only. Everything it
sends is read as size-limited msgpack frames (`common.frames`): never unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from common.frames import FrameError, recv_frame, send_frame
from node.sandbox import SandboxPolicy, child_environment

HELLO_BYTES = 1 << 20  # the child's "warm" and "ready" frames are small


class ChildFailed(RuntimeError):
    """The child could not do what was asked; `died` when it is gone, else it broke the protocol."""

    def __init__(self, message: str, *, died: bool = False) -> None:
        super().__init__(message)
        self.died = died


class TrainingProcess:
    """One confined training child; serves the rounds of the one job it is assigned."""

    def __init__(self, threads: int) -> None:
        self.scratch = tempfile.mkdtemp(prefix="fbm-train-")
        parent, child = socket.socketpair()
        fd = child.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.worker", "--fd", str(fd), "--threads", str(threads)],
            pass_fds=(fd,), env=child_environment(threads, self.scratch), cwd=self.scratch,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.sock = parent
        self.job: str | None = None
        self.sandbox: dict[str, Any] = {}
        self._warm = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_warm(self, timeout_s: float) -> None:
        """Until the child has imported torch; ChildFailed if it does not."""
        if not self._warm:
            hello = self._read(HELLO_BYTES, time.monotonic() + timeout_s, "start")
            if not isinstance(hello, dict) or hello.get("warm") is not True:
                raise ChildFailed("the training process did not say it was ready")
            self._warm = True

    def assign(self, job: str, policy: SandboxPolicy, timeout_s: float) -> dict[str, Any]:
        """Give the child its job: it confines itself to `policy` (with its own scratch folder)."""
        self.wait_warm(timeout_s)
        policy = dataclasses.replace(policy, scratch=self.scratch)
        self.send({"op": "assign", "job": job, "policy": dataclasses.asdict(policy)})
        ready = self._read(HELLO_BYTES, time.monotonic() + timeout_s, "confine itself")
        if not isinstance(ready, dict) or ready.get("ready") is not True or not isinstance(ready.get("sandbox"), dict):
            raise ChildFailed("the training process did not report its sandbox")
        self.job, self.sandbox = job, ready["sandbox"]
        return self.sandbox

    def send(self, obj: Any) -> int:
        """One frame to the child; its size in bytes. ChildFailed(died) if the child is gone."""
        try:
            return send_frame(self.sock, obj)
        except OSError as exc:
            raise ChildFailed(self._death(), died=True) from exc

    def answer(self, max_bytes: int, timeout_s: float) -> Any:
        """The child's next frame, within `timeout_s` (TimeoutError) and `max_bytes` (ChildFailed)."""
        deadline = time.monotonic() + timeout_s
        while not select.select([self.sock], [], [], 0.2)[0]:
            if not self.alive():
                raise ChildFailed(self._death(), died=True)
            if time.monotonic() > deadline:
                raise TimeoutError
        return self._read(max_bytes, deadline, "answer")

    def _read(self, max_bytes: int, deadline: float, doing: str) -> Any:
        try:
            return recv_frame(self.sock, max_bytes, deadline, torch_tensors=False)  # the node: no torch
        except FrameError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2 if "closed" in str(exc) else 0)
            if not self.alive():
                raise ChildFailed(self._death(), died=True) from exc
            raise ChildFailed(f"the training process broke the protocol ({exc}); it was stopped") from exc

    def _death(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        code = self.proc.returncode
        why = " (killed: out of memory?)" if code == -9 else ""
        return f"the training process died (exit code {code}){why}"

    def stop(self, kill: bool = False) -> None:
        """Ask the child to end (or kill it), reap it, remove its scratch folder."""
        if not kill and self.alive():
            with contextlib.suppress(OSError):
                send_frame(self.sock, {"op": "stop"})
        with contextlib.suppress(OSError):
            self.sock.close()
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        shutil.rmtree(self.scratch, ignore_errors=True)
