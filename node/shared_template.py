"""One training template for every node of a user on a host: the node's side, and its start.

25 nodes on one machine each paid for a template of their own (torch's ~220 MB of private
pages apiece). `fbm-node template --runtime-dir DIR` starts one (`node.zygote --listen`) that
every node configured with `training_template = DIR` asks for its training processes instead:
the node sends the job's socket (SCM_RIGHTS) and its sandbox policy, the template forks the
process, which confines itself to that policy at once, as with a node's own template.

Who may ask: DIR is the user's own and 0700; the template checks that a client runs as its
user (SO_PEERCRED) and knows the token written to DIR/token (0600). The token is what keeps a
training process out: it runs as the same user, and Landlock does not mediate connecting to a
Unix socket by path, but it cannot read DIR; the template holds only the token's sha256 (its
memory is what each training process starts from). The training process is the template's
child: the template reports its exit status to the node that asked, kills it when that node
asks (its own children only) or disconnects, and it dies with the template (PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import secrets
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.frames import FrameError, recv_frame, send_frame
from node.sandbox import child_environment
from node.training_process import HELLO_BYTES, ChildFailed

SOCKET_FILE, TOKEN_FILE = "template.sock", "token"  # as node.zygote names them (it imports torch)


def check_runtime_dir(path: Path) -> None:
    """ChildFailed unless `path` is a folder of ours that no one else may enter (0700)."""
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ChildFailed(f"{path} is not a 0700 folder of this user: not a training template's")


def prepare_runtime_dir(path: Path) -> str:
    """Create (or check) the 0700 runtime folder and write a fresh token; its sha256, hex."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_runtime_dir(path)
    token = secrets.token_hex(32)
    tmp = path / f".{TOKEN_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    tmp.replace(path / TOKEN_FILE)
    return hashlib.sha256(token.encode()).hexdigest()


def exec_template(runtime_dir: Path) -> None:
    """Become the host's template (`fbm-node template`): the token is forgotten with this image,
    and the template starts in a training process's scrubbed environment. Never returns."""
    runtime_dir = runtime_dir.expanduser().resolve()
    digest = prepare_runtime_dir(runtime_dir)
    argv = [sys.executable, "-m", "node.zygote", "--listen", str(runtime_dir), "--token-sha256", digest]
    os.execve(sys.executable, argv, child_environment(1, str(runtime_dir)))


def start_template(runtime_dir: Path, log: Path | None = None) -> subprocess.Popen:
    """`fbm-node template` as a child process (LocalFederation, tests); stop it with SIGTERM."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen([sys.executable, "-m", "node", "template", "--runtime-dir", str(runtime_dir)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()


class RemoteChild:
    """A training process the host template forked for us: `subprocess.Popen`'s poll, wait, kill."""

    def __init__(self, template: SharedTemplate, pid: int) -> None:
        self.template = template
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.template.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.template.wait_exit(self.pid, timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            self.template.kill(self.pid)


class SharedTemplate:
    """A node's connection to the host template: the `Zygote` interface (alive, wait_warm, fork,
    stop), exit statuses read by a thread of its own."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = Path(runtime_dir).expanduser().resolve()
        self.sock: socket.socket | None = None
        self.pid = 0
        self._lock = threading.Lock()  # one request at a time
        self._answers: queue.Queue = queue.Queue()
        self._exits: dict[int, int] = {}
        self._changed = threading.Condition()
        self._gone = False

    def alive(self) -> bool:
        return not self._gone

    def wait_warm(self, timeout_s: float) -> None:
        """Connect (retrying while the template starts); ChildFailed if it does not answer in time."""
        with self._lock:
            if self.sock is not None:
                return
            if self._gone:
                raise ChildFailed("the connection to the training template was closed", died=True)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    self.sock, self.pid = self._connect(deadline)
                    break
                except (FileNotFoundError, ConnectionRefusedError, FrameError) as exc:
                    if time.monotonic() > deadline:
                        self._gone = True
                        raise ChildFailed(f"no training template at {self.runtime_dir} ({exc})", died=True) from exc
                    time.sleep(0.2)
            threading.Thread(target=self._read_loop, name="template-reader", daemon=True).start()

    def _connect(self, deadline: float) -> tuple[socket.socket, int]:
        check_runtime_dir(self.runtime_dir)
        token = (self.runtime_dir / TOKEN_FILE).read_text().strip()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.runtime_dir / SOCKET_FILE))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                raise ChildFailed("the training template runs as another user")
            send_frame(sock, {"token": token})
            hello = recv_frame(sock, HELLO_BYTES, max(deadline, time.monotonic() + 5), torch_tensors=False)
        except BaseException:
            sock.close()
            raise
        if not isinstance(hello, dict) or hello.get("warm") is not True or type(hello.get("pid")) is not int:
            sock.close()
            raise FrameError("the training template refused us")
        sock.settimeout(None)
        return sock, hello["pid"]

    def _read_loop(self) -> None:
        """Exit reports go to `_exits`, fork answers to the queue; EOF: the template is gone."""
        try:
            while True:
                msg = recv_frame(self.sock, HELLO_BYTES, torch_tensors=False)  # type: ignore[arg-type]
                if isinstance(msg, dict) and type(msg.get("exit")) is int and type(msg.get("code")) is int:
                    with self._changed:
                        self._exits[msg["exit"]] = msg["code"]
                        self._changed.notify_all()
                else:
                    self._answers.put(msg)
        except (FrameError, OSError, ValueError):
            pass
        with self._changed:
            self._gone = True
            self._changed.notify_all()
        self._answers.put(None)

    def fork(self, sock: socket.socket, request: dict[str, Any], timeout_s: float) -> RemoteChild:
        """A new training process on `sock`'s other end, confined by `request["policy"]`."""
        self.wait_warm(timeout_s)
        with self._lock:
            try:
                socket.send_fds(self.sock, [b"F"], [sock.fileno()])  # type: ignore[arg-type]
                send_frame(self.sock, request)  # type: ignore[arg-type]
                answer = self._answers.get(timeout=timeout_s)
            except (OSError, queue.Empty) as exc:
                self.stop()  # a late answer would be taken for the next request's
                raise ChildFailed(f"the training template did not fork ({exc or 'timeout'})", died=True) from exc
        if not isinstance(answer, dict) or type(answer.get("pid")) is not int:
            raise ChildFailed(f"the training template could not fork: {answer!r:.200}", died=answer is None)
        return RemoteChild(self, answer["pid"])

    def exit_code(self, pid: int) -> int | None:
        """How `pid` ended, once the template said so; -9 if the template is gone (it took its
        children with it); None while it runs."""
        with self._changed:
            return self._exits.get(pid, -9 if self._gone else None)

    def wait_exit(self, pid: int, timeout: float | None) -> None:
        """Until the template reports `pid`'s end, or is gone, or `timeout` passes."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._gone, timeout)

    def kill(self, pid: int) -> None:
        """Ask the template to SIGKILL `pid` (it only kills children it forked for this node)."""
        with self._lock, contextlib.suppress(OSError, AttributeError):
            socket.send_fds(self.sock, [b"K"], [])  # type: ignore[arg-type]
            send_frame(self.sock, {"kill": pid})  # type: ignore[arg-type]

    def stop(self) -> None:
        """Disconnect: the template kills what it forked for us."""
        sock, self.sock = self.sock, None
        self._gone = True
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
