"""The training template ("zygote"): one warm interpreter per node from which every training
process is forked.

Started by the node (`node.training_process.Zygote`) with the scrubbed environment of a training
process, it imports torch, numpy and the training code, pays torch's first-step imports
(`node.worker.preimport`), then only forks: it never opens a key, a dataset or a plan, and runs
no one else's code. For each request (a frame with the job's sandbox policy, and the socket to
the node passed as a file descriptor) it forks twice: the intermediate exits at once, so the new
training process is re-parented to the node (a child subreaper) and the node waits for it as
its own child. The new process confines itself before anything else (`node.worker.serve`), and
shares the template's pages (torch's, the interpreter's) until it writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import sys
import time
import traceback
from typing import Any

import numpy as np

from common.frames import recv_frame, send_frame
from node import worker
from node.sandbox import die_with_parent

REQUEST_BYTES = 1 << 20


def _become_training_process(ctrl: socket.socket, fd: int, request: dict[str, Any]) -> None:
    """In the forked process: drop the template's socket, take the job's, wait to be re-parented
    to the node, then serve the job (confined first). Never returns."""
    code = 0
    try:
        ctrl.close()
        first_parent = os.getppid()
        deadline = time.monotonic() + 5
        while os.getppid() == first_parent and time.monotonic() < deadline:
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
            _become_training_process(ctrl, fd, request)
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


def serve(ctrl: socket.socket) -> None:
    """Say warm, then fork one training process per request until the node closes the socket."""
    worker.preimport()
    gc.collect()
    gc.freeze()  # the collector never writes to the template's objects: forks keep sharing their pages
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


def main() -> None:
    """`python -m node.zygote --fd N`: started by the node's Trainer, never by hand."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the control socket to the node")
    args = parser.parse_args()
    die_with_parent()
    ctrl = socket.socket(fileno=args.fd)
    with contextlib.suppress(KeyboardInterrupt):
        serve(ctrl)
    ctrl.close()


if __name__ == "__main__":
    main()
