"""The parent's handle on training processes: the template they are forked from, and one child.

The node starts one training template (`node.zygote`) before any job: a process with the scrubbed
environment of a training process that imports torch and then only forks. Each job's child is
forked from it on demand and confines itself to that job's policy right after the fork. The node
is a child subreaper, so the forked child is re-parented to it and waited for as its own child.
(With the host's shared template, `node.shared_template`, the child stays the template's and
the template reports how it ended.)
Everything a child sends is read as size-limited msgpack frames (`common.frames`): never
unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from common.frames import FrameError, recv_frame, send_frame
from node.sandbox import SandboxPolicy, become_subreaper, child_environment

HELLO_BYTES = 1 << 20  # the template's and the child's "warm" and "ready" frames are small


class ChildFailed(RuntimeError):
    """The child could not do what was asked; `died` when it is gone, else it broke the protocol."""

    def __init__(self, message: str, *, died: bool = False) -> None:
        super().__init__(message)
        self.died = died


def _reap(proc: subprocess.Popen | ForkedChild | None, scratch: str) -> None:
    """Wait for `proc` to end (killed after 5 s), then remove its scratch folder."""
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    shutil.rmtree(scratch, ignore_errors=True)


class ForkedChild:
    """A process the template forked and the node adopted: `subprocess.Popen`'s poll, wait, kill."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) ours to wait for
                done, status = self.pid, 0
            if done == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)


class Zygote:
    """The node's training template: forks a confined child per job (see the module docstring)."""

    def __init__(self) -> None:
        self.scratch = tempfile.mkdtemp(prefix="fbm-template-")
        become_subreaper()
        parent, child = socket.socketpair()
        fd = child.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.zygote", "--fd", str(fd)], pass_fds=(fd,),
            env=child_environment(1, self.scratch), cwd=self.scratch, stdin=subprocess.DEVNULL,
        )
        child.close()
        self.sock = parent
        self._lock = threading.Lock()
        self._warm = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_warm(self, timeout_s: float) -> None:
        """Until the template has imported torch; ChildFailed if it does not."""
        with self._lock:
            if self._warm:
                return
            hello = self._read(time.monotonic() + timeout_s)
            if not isinstance(hello, dict) or hello.get("warm") is not True:
                raise ChildFailed("the training template did not say it was ready")
            self._warm = True

    def fork(self, sock: socket.socket, request: dict[str, Any], timeout_s: float) -> ForkedChild:
        """A new training process on `sock`'s other end, confined by `request["policy"]`."""
        self.wait_warm(timeout_s)
        with self._lock:
            try:
                socket.send_fds(self.sock, [b"F"], [sock.fileno()])
                send_frame(self.sock, request)
            except OSError as exc:
                raise ChildFailed(f"the training template is gone ({exc})", died=True) from exc
            answer = self._read(time.monotonic() + timeout_s)
        if not isinstance(answer, dict) or type(answer.get("pid")) is not int:
            raise ChildFailed(f"the training template could not fork: {answer!r:.200}")
        return ForkedChild(answer["pid"])

    def _read(self, deadline: float) -> Any:
        try:
            return recv_frame(self.sock, HELLO_BYTES, deadline, torch_tensors=False)
        except FrameError as exc:
            raise ChildFailed(f"the training template failed ({exc})", died=not self.alive()) from exc

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()  # the template ends when its socket closes
        _reap(self.proc, self.scratch)


class TrainingProcess:
    """One confined training child, forked for one job from the template; serves its rounds."""

    def __init__(self, threads: int, zygote: Any) -> None:  # a Zygote or a node.shared_template.SharedTemplate
        self.scratch = tempfile.mkdtemp(prefix="fbm-train-")
        self.threads = threads
        self.zygote = zygote
        self.sock, self._child_end = socket.socketpair()
        self.proc: Any = None  # a ForkedChild, or a RemoteChild of the host's shared template
        self.job: str | None = None
        self.sandbox: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, timeout_s: float) -> None:
        """Fork the process now, before its job is known (a spare): it confines itself when
        `assign` sends the job's policy, and holds nothing of a job until then."""
        request = {"threads": self.threads, "scratch": self.scratch, "policy": None}
        try:
            self.proc = self.zygote.fork(self._child_end, request, timeout_s)
        finally:
            self._child_end.close()

    def assign(self, job: str, policy: SandboxPolicy, timeout_s: float) -> dict[str, Any]:
        """Give the process (forked now unless it is a spare) to `job`: it confines itself to
        `policy` (with its own scratch folder) and says how."""
        if self.proc is None:
            self.spawn(timeout_s)
        policy = dataclasses.replace(policy, scratch=self.scratch)
        self.send({"op": "confine", "policy": dataclasses.asdict(policy)})
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
                if self.proc is not None:
                    self.proc.wait(timeout=2 if "closed" in str(exc) else 0)
            if not self.alive():
                raise ChildFailed(self._death(), died=True) from exc
            raise ChildFailed(f"the training process broke the protocol ({exc}); it was stopped") from exc

    def _death(self) -> str:
        if self.proc is None:
            return "the training process was not started"
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        code = self.proc.returncode
        why = " (killed: out of memory?)" if code == -9 else ""
        if not self.zygote.alive():
            why = " (its training template is gone, and took it along)"
        return f"the training process died (exit code {code}){why}"

    def stop(self, kill: bool = False) -> None:
        """Ask the child to end (or kill it), reap it, remove its scratch folder."""
        if not kill and self.alive():
            with contextlib.suppress(OSError):
                send_frame(self.sock, {"op": "stop"})
        for sock in (self.sock, self._child_end):
            with contextlib.suppress(OSError):
                sock.close()
        if self.proc is not None and kill:
            self.proc.kill()
        _reap(self.proc, self.scratch)
