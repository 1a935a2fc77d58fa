"""What a training plan may touch: the child's environment, files, network and resources.

A plan is someone else's code running next to a hospital's data and the node's private key.
The training child therefore starts with a scrubbed environment (no broker settings, no
paths to credentials), and before it runs any plan it locks itself in:

- Landlock (Linux >= 5.13, unprivileged): read-only access to the Python installation, the
  system libraries and the one dataset of the job it serves (a child per job); read-write only to a private scratch folder;
  no TCP connect or bind (ABI >= 4); no signals to or abstract sockets of processes outside
  the sandbox (ABI >= 6). Landlock also forbids ptrace-style access (`/proc/<node>/environ`,
  `/proc/<node>/mem`) to the node, which is not sandboxed.
- rlimits: address space, file size, open files, no core dumps.
- no_new_privs, and death with the node (PR_SET_PDEATHSIG).

Where Landlock is missing, the child runs with the environment scrub and rlimits only and the
node logs `sandbox_degraded` when it starts a job's child.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

# x86_64 and aarch64 share the Landlock syscall numbers (they were added after the split).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 38, 1, 36

_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

# Read-only system locations a Python + torch process needs (missing ones are skipped).
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys", "/dev")
# Of /proc only the child's own folder and a few system-wide files: the node's /proc entries
# (its environment, its memory maps) stay out of reach.
PROC_READ_PATHS = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/filesystems", "/proc/sys/kernel",
                   "/proc/sys/vm")
# Environment variables the child keeps; everything else (FBM_*, credentials, tokens) is dropped.
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        version = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(0, int(version))


@dataclass(frozen=True)
class SandboxPolicy:
    """Everything the training child is allowed; sent to it before it runs any plan."""

    read_paths: tuple[str, ...] = ()
    scratch: str = ""
    memory_mb: int = 0  # address-space limit; 0: none
    file_size_mb: int = 1024
    open_files: int = 256
    landlock: bool = True

    def with_read_paths(self, extra: list[str]) -> SandboxPolicy:
        paths = tuple(dict.fromkeys([*self.read_paths, *extra]))
        return SandboxPolicy(paths, self.scratch, self.memory_mb, self.file_size_mb, self.open_files, self.landlock)

    def allows_reading(self, path: str) -> bool:
        p = Path(path).resolve()
        return any(p == Path(r) or Path(r) in p.parents for r in self.read_paths)


@dataclass
class Applied:
    """What the child actually got, reported to the node and the audit trail."""

    landlock_abi: int = 0
    rules: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def python_read_paths(secret_dirs: list[Path]) -> list[str]:
    """Where the interpreter and installed packages live, minus anything holding a secret.

    A `sys.path` entry that contains the node folder (a repo checkout used as the node folder,
    say) is replaced by the fedbiomq package folders themselves.
    """
    import common  # noqa: PLC0415 - the packages' own folders, wherever they are installed
    import node

    secrets = [s.resolve() for s in secret_dirs]
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix,
             str(Path(common.__file__).parent), str(Path(node.__file__).parent)}
    for entry in sys.path:
        if not entry or not Path(entry).is_dir():
            continue
        p = Path(entry).resolve()
        if any(s == p or p in s.parents for s in secrets):
            continue
        paths.add(str(p))
    return sorted(paths)


def child_environment(threads: int, scratch: str) -> dict[str, str]:
    """The child's whole environment: an allow-list, never the node's own environment."""
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP or k.startswith("LC_")}
    # numpy's OpenBLAS starts its worker threads when numpy is imported, before the child
    # confines itself (Landlock binds the calling thread only): one thread, none to escape by
    env.update({"HOME": scratch, "TMPDIR": scratch, "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def _set_limit(which: int, value: int, applied: Applied, name: str) -> None:
    try:
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
        applied.limits[name] = value
    except (ValueError, OSError) as exc:
        applied.problems.append(f"{name}: {exc}")


def _landlock(policy: SandboxPolicy, abi: int, applied: Applied) -> None:
    libc = _libc()
    handled_fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        handled_fs |= 1 << 13  # refer
    if abi >= 3:
        handled_fs |= _FS_TRUNCATE
    if abi >= 5:
        handled_fs |= _FS_IOCTL_DEV
    attr = _RulesetAttr(handled_fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    write = handled_fs
    try:
        own = (f"/proc/{os.getpid()}",)
        rules = [(p, read) for p in (*SYSTEM_READ_PATHS, *PROC_READ_PATHS, *own, *policy.read_paths)]
        rules.append(("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE))
        if policy.scratch:
            rules.append((policy.scratch, write))
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path that does not exist needs no rule
            try:
                if not os.path.isdir(path):
                    access &= _FS_FILE_ONLY & handled_fs
                rule = _PathBeneathAttr(access, fd)
                if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                    applied.problems.append(f"landlock rule for {path}: {os.strerror(ctypes.get_errno())}")
                else:
                    applied.rules += 1
            finally:
                os.close(fd)
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
        applied.landlock_abi = abi
    finally:
        os.close(ruleset)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends, and no privilege gains (the training template)."""
    if sys.platform.startswith("linux"):
        _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        no_new_privileges()


def no_new_privileges() -> None:
    """No setuid gains for this process and what it forks (the host's training template)."""
    if sys.platform.startswith("linux"):
        _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER): the node waits for the training
    processes its template forks as for its own children. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    return _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def confine(policy: SandboxPolicy) -> Applied:
    """Lock the calling process in (irreversibly). Called by the child before any plan runs."""
    applied = Applied()
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            applied.problems.append("no_new_privs could not be set")
    _set_limit(resource.RLIMIT_CORE, 0, applied, "core")
    _set_limit(resource.RLIMIT_NOFILE, policy.open_files, applied, "open_files")
    if policy.file_size_mb:
        _set_limit(resource.RLIMIT_FSIZE, policy.file_size_mb << 20, applied, "file_size")
    if policy.memory_mb:
        _set_limit(resource.RLIMIT_AS, policy.memory_mb << 20, applied, "address_space")
    threads = _thread_count()
    if threads > 1:  # Landlock, no_new_privs: the calling thread (and those it starts) only
        applied.problems.append(f"{threads - 1} thread(s) started before confinement stay unconfined")
    abi = landlock_abi() if policy.landlock else 0
    if abi:
        try:
            _landlock(policy, abi, applied)
        except OSError as exc:
            applied.problems.append(f"landlock: {exc}")
    elif policy.landlock:
        applied.problems.append("landlock is not available in this kernel: no filesystem or network confinement")
    return applied
