"""The parent side of training: one confined child process per job, its answers checked.

Each job gets its own child (`node.training_process`), forked from the node's training
template (torch imported once, at node start, before any job) and confined to that job's
dataset right after the fork, when the job is accepted if there is room (`prepare`), else at
its first round; it stays warm across the job's rounds and ends when the job
ends, when the node stops, or when it is the least recently used and a new job needs its
place (`max_processes`). The template itself reads no dataset and runs no plan.
Answers come back as size-limited frames and are checked against the task (`node.answers`)
before the node uses them; a child that breaks the protocol or sends a refused answer is
stopped, and its job gets a new one next round.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from node.answers import MAX_TEXT, AnswerRefused, check_failure, check_result, check_statistics
from node.sandbox import SandboxPolicy, python_read_paths
from node.shared_template import SharedTemplate
from node.statistics import StatisticsRefused
from node.training_process import ChildFailed, TrainingProcess, Zygote

ANSWER_SLACK_BYTES = 64 << 20  # metrics, timings and headers on top of the tensors


class TrainingFailed(RuntimeError):
    """A round could not be trained; the message says why (plan error, crash, timeout, memory, refused answer)."""


def dataset_read_paths(spec: dict[str, Any]) -> list[str]:
    """The files a dataset spec needs to be readable in the sandbox."""
    paths = [spec["path"]]
    for extra in (spec.get("labels"), spec.get("labels_found")):
        if extra:
            paths.append(extra)
    return [str(Path(p).resolve()) for p in paths]


def _job_key(task: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    return str(task["job"]), tuple(dataset_read_paths(task["dataset"]))


class Trainer:
    """A bounded pool of per-job training children (least recently used evicted first)."""

    def __init__(self, threads: int = 1, policy: SandboxPolicy | None = None,
                 secret_dirs: list[Path] | None = None, start_timeout_s: float = 120.0,
                 max_processes: int = 2,
                 on_started: Callable[[str, int, dict[str, Any]], None] | None = None,
                 template_dir: Path | None = None) -> None:
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.max_processes = max(1, max_processes)
        base = policy or SandboxPolicy()
        self.policy = base.with_read_paths(python_read_paths(list(secret_dirs or [])))
        self.log = structlog.get_logger("trainer")
        self.sandbox: dict[str, Any] = {}  # what the most recently assigned child got
        self.on_started = on_started  # (job, pid, sandbox) of each child assigned to a job: the audit
        self._procs: OrderedDict[tuple[str, tuple[str, ...]], TrainingProcess] = OrderedDict()
        self._spare: TrainingProcess | None = None  # forked ahead, not yet any job's (`make_spare`)
        self.template_dir = template_dir  # the host's shared template (`fbm-node template`); None: our own
        self._zygote: Zygote | SharedTemplate | None = None
        self._lock = threading.Lock()
        self._closing = False

    def start(self) -> None:
        """Start the training template, wait until torch is imported in it, and fork a spare
        (the node is then ready)."""
        self._template()
        self.make_spare()

    def make_spare(self) -> None:
        """Fork the next job's process ahead, while the node is idle (at start, after a job), so
        accepting a job costs a confinement and not a fork from a template that may be serving
        every node of the host at that moment. A spare holds nothing of any job until `assign`."""
        with self._lock:
            if self._closing or (self._spare is not None and self._spare.alive()):
                return
        try:
            child = TrainingProcess(self.threads, self._template())
            child.spawn(self.start_timeout_s)
        except (TrainingFailed, ChildFailed) as exc:  # a job forks its own, as without a spare
            self.log.warning("spare_not_forked", error=str(exc))
            return
        with self._lock:
            if self._closing or (self._spare is not None and self._spare.alive()):
                extra = child  # stopping, or another spare came first
            else:
                extra, self._spare = self._spare, child  # a dead spare, if any, goes
        if extra is not None:
            extra.stop(kill=True)

    def _take_spare(self) -> TrainingProcess:
        """The spare if it is alive (it is then no longer the spare), else a process to fork."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.alive():
            return spare
        if spare is not None:
            spare.stop(kill=True)
        return TrainingProcess(self.threads, self._template())

    def _template(self) -> Zygote | SharedTemplate:
        """The live training template, started (or connected to) and waited for if there is none."""
        with self._lock:
            if self._closing:
                raise TrainingFailed("the node is stopping")
            if self._zygote is not None and not self._zygote.alive():
                self.log.warning("training_template_died", pid=self._zygote.pid, shared=self.template_dir is not None)
                self._zygote.stop()
                self._zygote = None
            fresh = self._zygote is None
            if self._zygote is None:
                self._zygote = Zygote() if self.template_dir is None else SharedTemplate(self.template_dir)
            zygote = self._zygote
        try:
            zygote.wait_warm(self.start_timeout_s)
        except ChildFailed as exc:
            with self._lock:
                if self._zygote is zygote:
                    self._zygote = None
            zygote.stop()
            raise TrainingFailed(f"the training template failed to start: {exc}") from exc
        if fresh:
            self.log.info("training_template_warm", pid=zygote.pid, shared=self.template_dir is not None)
        return zygote

    def begin_close(self) -> None:
        """The node is stopping: no new child is started."""
        self._closing = True

    def jobs(self) -> list[str]:
        """The jobs that have a live child, least recently used first."""
        with self._lock:
            return [key[0] for key in self._procs]

    def pid(self, job: str) -> int | None:
        """The process id of the job's child, if it has one."""
        with self._lock:
            return next((c.pid for k, c in self._procs.items() if k[0] == job), None)

    def live_processes(self) -> int:
        """Job children alive now (never more than `max_processes`; the template not counted)."""
        with self._lock:
            children = list(self._procs.values())
        return sum(c.alive() for c in children)

    def prepare(self, job: str, dataset: dict[str, Any]) -> bool:
        """Fork the job's training process now (when the job is accepted), so its first round
        does not wait for the fork and the confinement: only if there is room (a running job's
        process is never evicted for a job that has not trained yet). Whether it is ready."""
        key = _job_key({"job": job, "dataset": dataset})
        log = self.log.bind(job=job)
        with self._lock:
            if key in self._procs or len(self._procs) >= self.max_processes or self._closing:
                return key in self._procs
        try:
            self._child_for(key, log)
        except TrainingFailed as exc:  # the first round tries again, and fails with the reason
            log.warning("training_process_not_prepared", error=str(exc))
            return False
        return True

    def run(self, task: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Train one round in the job's child; TrainingFailed on a plan error, crash, timeout,
        memory, or an answer that breaks the protocol or does not fit the model sent."""
        key = _job_key(task)
        log = self.log.bind(job=key[0], round=task.get("round"))
        child = self._child_for(key, log)
        sent = task["params"]
        try:
            size = child.send(task)
            answer = child.answer(4 * size + ANSWER_SLACK_BYTES, timeout_s)
        except TimeoutError:
            self._drop(key, child, log, "timeout")
            raise TrainingFailed(f"training took longer than {timeout_s:.0f}s and was stopped") from None
        except ChildFailed as exc:
            self._drop(key, child, log, "died" if exc.died else "protocol")
            raise TrainingFailed(f"{exc}; the next round starts a new one" if exc.died else str(exc)) from exc
        return self._checked(answer, sent, task, key, child, log)

    def statistics(self, task: dict[str, Any], policy: Any,
                   timeout_s: float) -> tuple[dict[str, Any], int, list[str], dict[str, Any]]:
        """Sufficient statistics computed in a one-shot confined child that may read the dataset
        only (outside the pool: it never evicts a job's child); (checked answer, its pid, the
        paths it could read). StatisticsRefused for a refusal; TrainingFailed otherwise."""
        paths = dataset_read_paths(task["dataset"])
        child = TrainingProcess(1, self._template())
        log = self.log.bind(statistics=task["dataset"].get("name"))
        try:
            sandbox = child.assign(f"statistics:{task['dataset'].get('name')}", self.policy.with_read_paths(paths),
                                   self.start_timeout_s)
            child.send({"op": "statistics", **task})
            features, bins = policy.max_features, int(task.get("bins") or 0)
            answer = child.answer(24 * features * (bins + 4) + ANSWER_SLACK_BYTES, timeout_s)
        except (ChildFailed, TimeoutError) as exc:
            log.warning("statistics_process_failed", error=str(exc) or "timeout")
            raise TrainingFailed(f"the statistics process failed: {exc or 'timeout'}") from exc
        finally:
            child.stop(kill=True)
        if isinstance(answer, dict) and answer.get("ok") is False and isinstance(answer.get("refused"), str):
            raise StatisticsRefused(answer["refused"][:MAX_TEXT])
        try:
            if isinstance(answer, dict) and answer.get("ok") is False:
                raise TrainingFailed(check_failure(answer)[0])
            checked = check_statistics(answer, bins=bins, min_rows=int(task["min_rows"]),
                                       max_rows=task["dataset"].get("n_samples") or 10**9, policy=policy)
        except AnswerRefused as exc:
            log.warning("statistics_answer_refused", reason=str(exc))
            raise TrainingFailed(f"the statistics process's answer was refused: {exc}") from exc
        return checked, child.pid, paths, sandbox

    def _checked(self, answer: Any, sent: dict[str, Any], task: dict[str, Any], key, child, log) -> dict[str, Any]:
        try:
            if isinstance(answer, dict) and answer.get("ok") is False:
                error, trace = check_failure(answer)
                log.warning("plan_failed", error=error, traceback=trace)
                raise TrainingFailed(error)
            return check_result(answer, sent, task["dataset"].get("n_samples"))
        except AnswerRefused as exc:
            self._drop(key, child, log, "refused")
            log.warning("answer_refused", reason=str(exc))
            raise TrainingFailed(f"the training process's answer was refused: {exc}; it was stopped") from exc

    def _child_for(self, key: tuple[str, tuple[str, ...]], log: Any) -> TrainingProcess:
        """The job's live child, or a new one forked from the template and assigned to it."""
        with self._lock:
            child = self._procs.get(key)
            if child is not None and child.alive():
                self._procs.move_to_end(key)
                return child
        if child is not None:
            self._drop(key, child, log, "died")
        if self._closing:
            raise TrainingFailed("the node is stopping")
        self._evict(room_for=1)
        child = self._take_spare()
        with self._lock:
            self._procs[key] = child
        policy = self.policy.with_read_paths(list(key[1]))
        try:
            self.sandbox = child.assign(key[0], policy, self.start_timeout_s)
        except (ChildFailed, TimeoutError) as exc:
            self._drop(key, child, log, "start")
            raise TrainingFailed(f"the training process for this job did not start: {exc}") from exc
        for problem in self.sandbox.get("problems", []):
            log.warning("sandbox_degraded", problem=problem)
        log.info("training_process_ready", pid=child.pid, landlock_abi=self.sandbox.get("landlock_abi"),
                 datasets=list(key[1]), limits=self.sandbox.get("limits"))
        if self.on_started is not None:
            self.on_started(key[0], child.pid, self.sandbox)
        return child

    def _evict(self, room_for: int) -> None:
        """Stop the least recently used job children until `room_for` more fit."""
        while True:
            with self._lock:
                if not self._procs or len(self._procs) + room_for <= self.max_processes:
                    return
                key, child = self._procs.popitem(last=False)
            self.log.info("training_process_evicted", job=key[0], pid=child.pid)
            child.stop()

    def _drop(self, key, child: TrainingProcess, log, why: str) -> None:
        with self._lock:
            if self._procs.get(key) is child:
                del self._procs[key]
        log.info("training_process_stopped", pid=child.pid, why=why)
        child.stop(kill=why != "done")

    def end_job(self, job: str) -> None:
        """The job ended, was withdrawn or its plan revoked: its child ends too."""
        with self._lock:
            ended = [(k, c) for k, c in self._procs.items() if k[0] == job]
        for key, child in ended:
            self._drop(key, child, self.log.bind(job=job), "done")
        self.make_spare()  # the node is idle of this job: the next one's process, ahead

    def stop(self) -> None:
        """End every child and the template (the node stops)."""
        with self._lock:
            children = list(self._procs.values())
            self._procs.clear()
            zygote, self._zygote = self._zygote, None
            if self._spare is not None:
                children.append(self._spare)
                self._spare = None
        for child in children:
            child.stop()
        if zygote is not None:
            zygote.stop()
