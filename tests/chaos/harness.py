"""Run a small FedAvg job on a real local federation and inject a fault at a chosen moment."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from broker import process
from broker.local import LocalFederation
from common.identity import Identity
from common.messenger import Messenger
from common.sealed import Keyring
from common.settings import TransportSettings
from researcher.experiment import Experiment, JobState
from scripts import fmnist

NODES = ["site-1", "site-2", "site-3"]
PLAN = Path(__file__).with_name("slow_plan.py")
NODE_ENV = {"FBM_NODE_RESEND_AFTER_S": "2", "FBM_MQTT_RECONNECT_MAX_S": "2"}


@dataclass
class Run:
    """One federation and what an admin observer saw of its job."""

    fed: LocalFederation
    events: queue.Queue = field(default_factory=queue.Queue)
    logs: dict[str, str] = field(default_factory=dict)
    seen: list = field(default_factory=list)
    observer: Messenger | None = None

    def node_proc(self, name: str):
        return self.fed.process(f"node-{name}")

    def agg_proc(self):
        return self.fed.process("agg-fedavg-1")

    def kill(self, proc, sig=signal.SIGKILL) -> None:
        """Signal a role process and its training child (they share a process group)."""
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def start_node(self, name: str) -> None:
        self.fed.start_node(name, env=NODE_ENV)

    def restart_broker(self, hard: bool) -> None:
        process.stop(self.fed.ws, hard=hard)
        time.sleep(0.5)
        process.start(self.fed.ws)

    def wait_event(self, predicate: Callable, timeout_s: float = 120.0):
        """Block until the observer sees a message matching `predicate` (kept for later checks)."""
        deadline = time.monotonic() + timeout_s
        for msg in self.seen:
            if predicate(msg):
                return msg
        while time.monotonic() < deadline:
            try:
                msg = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(msg)
            if predicate(msg):
                return msg
        raise TimeoutError("the awaited event never came")


def opened(r: int) -> Callable:
    return lambda m: m.type == "round_opened" and m.body.round == r


def acked(r: int) -> Callable:
    return lambda m: m.type == "update_received" and m.body.round == r


def _unequal_shards(folder: Path) -> list[Path]:
    """300, 300 and 600 samples: site-3 trains twice as long, so a fault struck when the first
    update of a round is acknowledged lands while the round is still open (with equal shards
    the other two updates could close it first, and the test would not be mid-round)."""
    import numpy as np

    parts = fmnist.write_shards(folder, 4, limit=1200, seed=1)
    with np.load(parts[2]) as a, np.load(parts[3]) as b:
        x, y = np.concatenate([a["x"], b["x"]]), np.concatenate([a["y"], b["y"]])
    np.savez(parts[2], x=x, y=y)
    return parts[:3]


def federation(start_nodes: list[str] = NODES, aggregators: tuple[str, ...] = ("fedavg-1",),
               agg_env: dict[str, str] | None = None) -> Run:
    fed = LocalFederation().start()
    shards = _unequal_shards(fed.root / "data")
    for name, shard in zip(NODES, shards, strict=True):
        fed.add_node(name, [{"name": "fm", "type": "npz", "path": str(shard), "tag": "fmnist"}],
                     start=name in start_nodes, env=NODE_ENV, approve=[(PLAN, "SlowMLP")])
    for name in aggregators:
        fed.add_aggregator(name, start=False)
    for name in aggregators:  # spawned one right after the other: they start at the same moment
        fed.start_aggregator(name, env=agg_env)
    fed.enroll("alice", "researcher")
    fed.wait_online(set(start_nodes))
    run = Run(fed)
    observer = Messenger(Identity.load(fed.enroll("chaos-observer", "admin")),
                         TransportSettings(clean_start=True, session_expiry_s=0, reconnect_max_s=2),
                         client_id="chaos-observer")
    observer.subscribe("fbm/v1/jobs/+/+/events", run.events.put)
    observer.subscribe("fbm/v1/nodes/+/requests", run.events.put, types={"update_received"})  # acks go to each node
    observer.subscribe("fbm/v1/jobs/+/+/claims/+", run.events.put, types={"job_claim"})  # the audit of claims
    # the sites' secure-aggregation messages, sealed for the job's aggregator: the observer reads
    # them with the (first) aggregator's key
    observer.keyring = Keyring.of(aggregators[0], Identity.load(fed.ws.bundle_dir(aggregators[0])).key)
    observer.subscribe("fbm/v1/jobs/+/+/secagg/+", run.events.put)
    observer.connect()
    run.observer = observer
    return run


def experiment(run: Run, *, rounds: int = 3, quorum: int = 3, stragglers: str = "wait", deadline_s: float = 90,
               step_delay_s: float = 0.05, secure_aggregation: dict | None = None) -> Experiment:
    return Experiment(
        Identity.load(run.fed.ws.bundle_dir("alice")), plan=PLAN, plan_class="SlowMLP", tags=["fmnist"],
        rounds=rounds, quorum=quorum, round_deadline_s=deadline_s,
        model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
        training_args={"epochs": 1, "lr": 0.05, "batch_size": 30, "step_delay_s": step_delay_s},
        seed=3, mqtt=TransportSettings(reconnect_max_s=2), secure_aggregation=secure_aggregation,
    )


def finish(run: Run, exp: Experiment, timeout_s: float = 180.0) -> JobState:
    state = exp.watch(timeout_s=timeout_s, progress=False)
    exp.close()
    return state


def teardown(run: Run) -> None:
    if run.observer is not None:
        run.observer.close()
    run.fed.stop()
    run.logs = {p.stem: p.read_text(errors="replace") for p in (run.fed.root / "logs").glob("*.log")}
    run.logs["broker"] = run.fed.ws.log_file.read_text(errors="replace")
    shutil.rmtree(run.fed.root, ignore_errors=True)


def run_job(fault: Callable[[Run], None] | None = None, **job) -> tuple[JobState, Run]:
    """A 3-node job with `fault(run)` running beside it; returns the final state."""
    run = federation()
    try:
        exp = experiment(run, **job)
        exp.submit()
        worker = None
        if fault is not None:
            worker = threading.Thread(target=fault, args=(run,), daemon=True)
            worker.start()
        state = finish(run, exp)
        if worker is not None:
            worker.join(timeout=60)
        return state, run
    finally:
        teardown(run)


def folds(state: JobState) -> list[tuple[int, str]]:
    """Every (round, node) the aggregator folded in, in its own record."""
    return [(h["round"], r["node"]) for h in state.history for r in h["reports"]]


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
