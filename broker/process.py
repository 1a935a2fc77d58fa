"""Running Mosquitto as a process this workspace owns (pid file, log file, clear failures)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from broker.auth_plugin import PluginBuildError
from broker.workspace import MOSQUITTO_USER, Workspace


class BrokerError(RuntimeError):
    """The broker could not be started, stopped or reached; the message says why."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    listening: bool
    port: int
    detail: str


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise BrokerError("mosquitto is not installed (Debian: apt-get install -y mosquitto)")
    return found


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our child and has exited
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def read_pid(ws: Workspace) -> int | None:
    try:
        pid = int(ws.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _check_reachable_by(user: str, path: Path) -> None:
    """Mosquitto drops to `user` before reading its files: every parent must let it through."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == entry.pw_uid:
            continue
        if not st.st_mode & stat.S_IXOTH and not (st.st_gid == entry.pw_gid and st.st_mode & stat.S_IXGRP):
            raise BrokerError(
                f"Mosquitto runs as user {user!r} and cannot enter {parent} (mode {stat.filemode(st.st_mode)}). "
                f"Keep the workspace where {user!r} can reach it (e.g. chmod o+x {parent}) or start the "
                "broker as a non-root user."
            )


def _log_tail(ws: Workspace, lines: int = 15) -> str:
    try:
        return "\n".join(ws.log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(ws: Workspace, wait_s: float = 15.0) -> int:
    """Start Mosquitto for this workspace in the background; returns its pid once it listens."""
    fed = ws.federation()
    pid = read_pid(ws)
    if pid is not None:
        raise BrokerError(f"the broker of {ws.root} is already running (pid {pid})")
    if _listening(fed.port):
        raise BrokerError(f"port {fed.port} is already in use by another process; pick another with `init --port`")
    binary = mosquitto_binary()
    try:
        ws.write_broker_config()
    except PluginBuildError as exc:
        raise BrokerError(str(exc)) from None
    if os.geteuid() == 0:
        _check_reachable_by(MOSQUITTO_USER, ws.broker_dir)
    with open(ws.log_file, "ab") as log:
        proc = subprocess.Popen(
            [binary, "-c", str(ws.conf_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    ws.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            ws.pid_file.unlink(missing_ok=True)
            raise BrokerError(f"mosquitto exited with code {proc.returncode}:\n{_log_tail(ws)}")
        if _listening(fed.port):
            return proc.pid
        time.sleep(0.05)
    proc.terminate()
    raise BrokerError(f"mosquitto did not listen on port {fed.port} within {wait_s:.0f}s:\n{_log_tail(ws)}")


def stop(ws: Workspace, timeout_s: float = 15.0, *, hard: bool = False) -> bool:
    """SIGTERM (or SIGKILL with `hard`) the broker and wait; False if it was not running."""
    pid = read_pid(ws)
    if pid is None:
        ws.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            break
        time.sleep(0.05)
    ws.pid_file.unlink(missing_ok=True)
    return True


def reload(ws: Workspace) -> bool:
    """SIGHUP: Mosquitto re-reads the ACL file without dropping anyone. False if not running."""
    pid = read_pid(ws)
    if pid is None:
        return False
    os.kill(pid, signal.SIGHUP)
    return True


def status(ws: Workspace) -> BrokerStatus:
    fed = ws.federation()
    pid = read_pid(ws)
    listening = _listening(fed.port)
    if pid and listening:
        detail = f"running (pid {pid}), listening on port {fed.port}"
    elif pid:
        detail = f"process {pid} is up but nothing listens on port {fed.port}; see {ws.log_file}"
    elif listening:
        detail = f"not started by this workspace, but another process listens on port {fed.port}"
    else:
        detail = f"stopped (start it with `fbm-broker start {ws.root}`)"
    return BrokerStatus(running=pid is not None, pid=pid, listening=listening, port=fed.port, detail=detail)
