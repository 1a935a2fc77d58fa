"""Process-tree memory sampling from /proc (no psutil needed), for the benchmarks."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def tree(pids: list[int]) -> set[int]:
    """`pids` and all their descendants."""
    children = _children_map()
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (torch's libraries, say) divided among their users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) of `pid`; (0, 0) when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def roles(pids: set[int]) -> dict[int, str]:
    """Each process's role in a federation: broker, aggregator, node, template, training, other.

    A training process is a fork of its template, so it has the template's command line: it is
    the one whose parent is a template, or (one template per node, double fork: re-parented to
    the node) a later-started template-looking sibling of its node's template."""
    info = {p: (_cmdline(p), *_stat(p)) for p in pids}
    zygotes = {p for p, (cmd, _, _) in info.items() if "node.zygote" in cmd}
    first: dict[int, tuple[int, int]] = {}  # parent -> (start, pid) of its earliest zygote child
    for p in zygotes:
        _, parent, start = info[p]
        first[parent] = min(first.get(parent, (start, p)), (start, p))
    out = {}
    for p, (cmd, parent, _) in info.items():
        if p in zygotes:
            out[p] = "training" if parent in zygotes or first[parent][1] != p else "template"
        elif "mosquitto" in cmd:
            out[p] = "broker"
        elif "-m aggregators" in cmd:
            out[p] = "aggregator"
        elif "-m node" in cmd:
            out[p] = "node"
        else:
            out[p] = "other"
    return out


def breakdown(pss: dict[int, int]) -> dict[str, dict[str, float]]:
    """PSS by role: count of processes, sum, smallest and largest, in MB."""
    by_role: dict[str, list[int]] = {}
    for pid, role in roles(set(pss)).items():
        by_role.setdefault(role, []).append(pss[pid])
    return {role: {"n": len(v), "sum_mb": sum(v) / 1e6, "min_mb": min(v) / 1e6, "max_mb": max(v) / 1e6}
            for role, v in sorted(by_role.items())}


def format_breakdown(parts: dict[str, dict[str, float]]) -> str:
    """One line per role, for the benchmarks' output."""
    return "\n".join(f"  {role:<10} {v['n']:>3.0f} processes  {v['sum_mb']:>8.0f} MB PSS  "
                     f"(each {v['min_mb']:.0f}-{v['max_mb']:.0f} MB)" for role, v in parts.items())


class PeakRSS:
    """Samples the summed RSS of a set of process trees in the background; keeps the peak, and
    the PSS breakdown by role (`breakdown`) of the sample with the highest total PSS."""

    def __init__(self, roots: callable, interval_s: float = 0.5) -> None:  # type: ignore[valid-type]
        self.roots = roots
        self.interval_s = interval_s
        self.peak = 0
        self.peak_pss = 0
        self.samples = 0
        self.peak_parts: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # The sampler is the benchmark's, not the federation's: a PSS sample walks every mapping
        # of ~50 processes (~0.1 CPU s), 0.2 CPU s in a 4 s job on 2 cores. At nice 19 (this
        # thread only) it takes CPU the federation leaves, so it does not lengthen the job it times.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> int:
        pids = tree(self.roots())
        total = sum(rss_bytes(p) for p in pids)
        self.peak = max(self.peak, total)
        if self.samples % 4 == 0:  # smaps_rollup walks every mapping: sample it less often
            pss = {p: pss_bytes(p) for p in pids}
            if sum(pss.values()) > self.peak_pss:
                self.peak_pss, self.peak_parts = sum(pss.values()), breakdown(pss)
        self.samples += 1
        return total

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed_job(exp, timeout_s: float = 3600):  # (Experiment) -> (JobState, seconds)
    """Submit `exp`, follow it to its end; its final state and the wall time. RuntimeError if it failed."""
    import time as _time

    start = _time.perf_counter()
    exp.submit()
    state = exp.watch(timeout_s=timeout_s, progress=False)
    wall = _time.perf_counter() - start
    if state.status != "done":
        raise RuntimeError(state.reason)
    return state, wall


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (/proc/PID/stat), 0.0 if it is gone."""
    import os as _os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """CPU seconds of named processes sampled with the wall clock in the background, so that
    the CPU of a time window (a job's steady rounds) can be read afterwards."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        import time as _time

        self.pids, self.interval_s, self._time = pids, interval_s, _time.time
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((self._time(), {k: cpu_seconds(p) for k, p in self.pids.items()}))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self._time(), {k: cpu_seconds(p) for k, p in self.pids.items()}))

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each process used from wall time `start` to `end` (nearest samples)."""
        def at(t: float) -> dict[str, float]:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        first, last = at(start), at(end)
        return {k: last[k] - first[k] for k in self.pids}
