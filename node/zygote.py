"""The training template ("zygote"): one warm interpreter from which every training process is
forked: one per node (the default), or one for every node of a user on a host (`--listen`).

Started by the node (`node.training_process.Zygote`) with the scrubbed environment of a training
process, it imports torch, numpy and the training code, pays torch's first-step imports
(`node.worker.preimport`) and its one-time kernel and allocator costs on one thread
(`node.worker.warm_template`), then only forks: it never opens a key, a dataset or a plan, and runs
no one else's code. For each request (a frame with the job's sandbox policy, and the socket to
the node passed as a file descriptor) it forks twice: the intermediate exits at once, so the new
training process is re-parented to the node (a child subreaper) and the node waits for it as
its own child. The new process confines itself before anything else (`node.worker.serve`), and
shares the template's pages (torch's, the interpreter's) until it writes them.

With `--listen DIR` (started by `fbm-node template`) one template serves many nodes through a
Unix socket in DIR (`node.shared_template`): it forks once, stays the parent, reaps each child
and reports its exit status to the node that asked, kills it when that node asks or goes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import hmac
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.frames import recv_frame, send_frame
from node import worker
from node.sandbox import die_with_parent, no_new_privileges

REQUEST_BYTES = 1 << 20
SOCKET_FILE, TOKEN_FILE = "template.sock", "token"
AUTH_TIMEOUT_S = 5.0  # a client that connects must say its token (and a request its frame) within this
_PR_SET_NAME = 15


def _name_process(name: bytes) -> None:
    """What `ps` and /proc/PID/comm show: templates and training processes share a command line."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _become_training_process(close: Callable[[], None], fd: int, request: dict[str, Any],
                             reparented: bool = True) -> None:
    """In the forked process: drop every descriptor of the template's (`close`), take the job's,
    wait to be re-parented to the node (one template per node), then serve the job (confined
    first). Never returns."""
    code = 0
    try:
        close()
        _name_process(b"fbm-train")
        first_parent = os.getppid()
        deadline = time.monotonic() + 5
        while reparented and os.getppid() == first_parent and time.monotonic() < deadline:
            time.sleep(0.001)  # the intermediate exits at once; PDEATHSIG must name the node
        scratch = request["scratch"]
        os.environ.update({"HOME": scratch, "TMPDIR": scratch})
        os.chdir(scratch)
        np.random.seed()  # not the template's state: every process its own, as if started afresh
        sys.argv = [sys.argv[0], "--fd", str(fd), "--threads", str(request["threads"])]  # what it serves on
        with socket.socket(fileno=fd) as sock:
            worker.serve(sock, int(request["threads"]), request["policy"])
    except BaseException:  # noqa: BLE001 - the process ends here whatever happened
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _fork(ctrl: socket.socket, fd: int, request: dict[str, Any]) -> int:
    """Fork the job's training process (re-parented to the node); its pid."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            _become_training_process(ctrl.close, fd, request)
        os.write(write_end, pid.to_bytes(4, "little"))
        os._exit(0)
    os.close(write_end)
    try:
        raw = os.read(read_end, 4)
    finally:
        os.close(read_end)
        os.close(fd)
        os.waitpid(middle, 0)
    if len(raw) != 4:
        raise OSError("the fork did not report its pid")
    return int.from_bytes(raw, "little")


def _warm() -> None:
    """What the template does once, before any fork: torch's first-step imports and one-time
    costs, then its objects frozen out of the collector (which would write to them, and so
    copy every page a fork shares with it)."""
    worker.preimport()
    worker.warm_template()
    gc.collect()
    gc.freeze()


def serve(ctrl: socket.socket) -> None:
    """Say warm, then fork one training process per request until the node closes the socket."""
    _warm()
    send_frame(ctrl, {"warm": True, "pid": os.getpid()})
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(ctrl, 1, 1)
            request = recv_frame(ctrl, REQUEST_BYTES) if fds else None
        except (OSError, RuntimeError):
            return
        if not fds or not isinstance(request, dict):
            for fd in fds:
                os.close(fd)
            return
        try:
            send_frame(ctrl, {"pid": _fork(ctrl, fds[0], request)})
        except OSError as exc:
            send_frame(ctrl, {"error": f"fork failed: {exc}"})


@dataclass(eq=False)
class _Client:
    """A node connected to the host template: its socket and the pids forked for it."""

    sock: socket.socket
    pids: dict[int, int] = field(default_factory=dict)  # pid -> pidfd
    open: bool = True


class HostTemplate:
    """One template for the nodes of one user on one host: a single-threaded loop over the
    listening socket, the nodes' connections and a pidfd per child (no thread: forks stay safe)."""

    def __init__(self, listener: socket.socket, token_sha256: bytes) -> None:
        self.listener = listener
        self.token_sha256 = token_sha256  # only the digest: a forked child holds no usable token
        self.selector = selectors.DefaultSelector()
        self.clients: list[_Client] = []
        self.pidfds: set[int] = set()  # of every live child, whoever's node is gone or not
        self.selector.register(listener, selectors.EVENT_READ, ("accept",))

    def run(self) -> None:
        """Serve until killed (SIGTERM): the children die with it (PDEATHSIG)."""
        while True:
            for key, _ in self.selector.select():
                kind, *rest = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "child":
                    self._reap(key.fd, *rest)
                else:
                    self._serve(*rest)

    def _accept(self) -> None:
        """A node connects: same user (SO_PEERCRED) and the token's digest, or it is dropped."""
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        try:
            hello = recv_frame(conn, 4096, time.monotonic() + AUTH_TIMEOUT_S, torch_tensors=False)
            token = hello.get("token") if isinstance(hello, dict) else None
            ok = uid == os.getuid() and isinstance(token, str) and hmac.compare_digest(
                hashlib.sha256(token.encode()).digest(), self.token_sha256)
            if ok:
                conn.settimeout(None)
                send_frame(conn, {"warm": True, "pid": os.getpid()})
        except (OSError, RuntimeError):
            ok = False
        if not ok:
            conn.close()
            return
        client = _Client(conn)
        self.clients.append(client)
        self.selector.register(conn, selectors.EVENT_READ, ("client", client))

    def _serve(self, client: _Client) -> None:
        """One request: b"F" + the job's socket + a frame (fork), or b"K" + {"kill": pid}."""
        msg, fds, request = b"", [], None
        try:
            msg, fds, _, _ = socket.recv_fds(client.sock, 1, 1)
            request = recv_frame(client.sock, REQUEST_BYTES, time.monotonic() + AUTH_TIMEOUT_S) if msg else None
            client.sock.settimeout(None)
        except (OSError, RuntimeError):
            msg = b""
        if msg == b"F" and len(fds) == 1 and isinstance(request, dict):
            self._fork(client, fds[0], request)
        elif msg == b"K" and not fds and isinstance(request, dict):
            if request.get("kill") in client.pids:  # its own only; one already reaped: nothing to do
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(client.pids[request["kill"]], signal.SIGKILL)
        else:  # EOF or a broken request: the node is gone, and so are its children
            for fd in fds:
                os.close(fd)
            self._drop(client)

    def _fork(self, client: _Client, fd: int, request: dict[str, Any]) -> None:
        """Fork the job's training process (our child); tell the node its pid."""
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fd)
            self._send(client, {"error": f"fork failed: {exc}"})
            return
        if pid == 0:
            _become_training_process(self._close_in_child, fd, request, reparented=False)
        os.close(fd)
        pidfd = os.pidfd_open(pid)
        client.pids[pid] = pidfd
        self.pidfds.add(pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, ("child", pid, client))
        self._send(client, {"pid": pid})

    def _close_in_child(self) -> None:
        """In a new child: none of the template's sockets or pidfds (nor another node's) stay open."""
        for client in self.clients:
            client.sock.close()
        for pidfd in self.pidfds:
            os.close(pidfd)
        self.listener.close()
        self.selector.close()

    def _reap(self, pidfd: int, pid: int, client: _Client) -> None:
        """A child ended: reap it, tell its node how (exit code, or minus the signal)."""
        self.selector.unregister(pidfd)
        os.close(pidfd)
        self.pidfds.discard(pidfd)
        client.pids.pop(pid, None)
        _, status = os.waitpid(pid, 0)
        self._send(client, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, client: _Client, obj: dict[str, Any]) -> None:
        if client.open:
            try:
                send_frame(client.sock, obj)
            except OSError:
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        """The node closed its connection (or broke the protocol): kill what was forked for it."""
        if not client.open:
            return
        client.open = False
        self.selector.unregister(client.sock)
        client.sock.close()
        self.clients.remove(client)
        for pidfd in client.pids.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # reaped when its pidfd says so


def listen(runtime_dir: Path, token_sha256: bytes) -> None:
    """Warm up, then serve the host's nodes on `runtime_dir`/template.sock (`fbm-node template`)."""
    _warm()
    path = runtime_dir / SOCKET_FILE
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a previous template's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(128)
    _name_process(b"fbm-template")
    HostTemplate(listener, token_sha256).run()


def main() -> None:
    """`python -m node.zygote --fd N` (started by the node's Trainer) or `--listen DIR
    --token-sha256 HEX` (started by `fbm-node template`); never by hand."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--fd", type=int, help="the control socket to the node")
    parser.add_argument("--listen", type=Path, help="serve every node of this user from this runtime folder")
    parser.add_argument("--token-sha256", default="", help="the digest of the token a node must present")
    args = parser.parse_args()
    if args.listen is not None:  # not PDEATHSIG: its starter's thread may end long before the nodes
        no_new_privileges()
        with contextlib.suppress(KeyboardInterrupt):
            listen(args.listen, bytes.fromhex(args.token_sha256))
        return
    die_with_parent()
    _name_process(b"fbm-template")
    ctrl = socket.socket(fileno=args.fd)
    with contextlib.suppress(KeyboardInterrupt):
        serve(ctrl)
    ctrl.close()


if __name__ == "__main__":
    main()
