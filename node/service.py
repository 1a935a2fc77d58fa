"""The long-running site process: takes jobs it can serve, trains each open round, publishes updates.

It learns everything from retained messages (the job spec, and the latest global model, which
also says which round is open and for whom), so a node that was offline simply joins the
current round when it comes back. Each job trains in a confined child process of its own,
kept warm across the job's rounds, driven from a thread of its own, so message handling never
waits for it.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from common import topics
from common.compression import CompressionSpec, encode_update
from common.envelope import Message, open_envelope
from common.errors import BadMessage, TransportError
from common.identity import Identity
from common.messages import JobSpec, NodeStatus, Reply, is_selective
from common.messenger import Messenger
from common.training.catalog import ZOO_ALGORITHMS, LocalError, algorithm_of
from common.training.loader import PlanError, check_ref
from node.accountant import job_epsilon
from node.audit import AuditTrail
from node.binding import JobBindings
from node.caps import cap_refusal
from node.config import NodeSettings
from node.job_store import JobStore
from node.plans import PlanStatus, PlanStore, plan_id
from node.policy import JobAsk, job_ask, policy_refusal
from node.privacy_budget import PrivacyLedger, QueryLedger
from node.registry import Dataset, Registry
from node.sandbox import SandboxPolicy
from node.secagg import SecureRounds, as_params, secure_refusal
from node.state import NodeState
from node.statistics import StatisticsRefused, check_request
from node.trainer import Trainer, TrainingFailed

VERSION = "0.1.0"
EARLY_MODELS = 4  # models of not-yet-known jobs held until their job arrives (latest per job)


def sandbox_policy(settings: NodeSettings) -> SandboxPolicy:
    return SandboxPolicy(memory_mb=settings.train_memory_mb, file_size_mb=settings.train_file_size_mb,
                         landlock=settings.sandbox)


def _dataset_spec(ds: Dataset) -> dict[str, Any]:
    """What the training child needs to load a dataset (its path stays on this machine); the
    sample count bounds the one a training answer may claim."""
    return {"type": ds.type, "path": ds.path, "target": ds.target, "labels": ds.labels, "name": ds.name,
            "labels_found": ds.meta.get("labels"), "n_samples": ds.public().n_samples or None}


@dataclass
class _Job:
    spec: JobSpec
    dataset: Dataset
    trained: set[int] = field(default_factory=set)
    last_send_s: float = 0.0
    # what the local algorithm keeps between rounds (SCAFFOLD's c_i, ADMM's x_i and u_i);
    # in memory: a restarted node starts these afresh, which both algorithms tolerate
    local_state: dict[str, Any] = field(default_factory=dict)
    residual: dict[str, Any] = field(default_factory=dict)  # what update compression dropped (error feedback)


@dataclass
class _Parked:
    """A job waiting for its plan's approval; the latest model is kept so it can join at once."""

    spec: JobSpec
    dataset: Dataset
    sender: str
    msg_id: str
    model: Any = None
    wire: bytes | bytearray | memoryview = b""


@dataclass(frozen=True)
class _Pending:
    """An update sent but not yet acknowledged by the aggregator: re-sent until it is."""

    job: str
    round: int
    body: dict[str, Any]
    msg_id: str
    sent_at: float


@dataclass(frozen=True)
class _JobOver:
    """Tells the training thread a job ended: its training process ends too."""

    job: str


@dataclass(frozen=True)
class _Task:
    job: str
    round: int
    params: dict[str, Any]
    received_at: float
    extra: dict[str, Any] = field(default_factory=dict)


class NodeService:
    """One site: its datasets, its jobs, its training process, its connection."""

    def __init__(self, settings: NodeSettings, identity: Identity, registry: Registry, audit: AuditTrail,
                 trainer: Trainer | None = None) -> None:
        self.settings = settings
        self.identity = identity
        self.name = identity.name
        self.registry = registry
        self.audit = audit
        self.plans = PlanStore(registry.db)
        self.state = NodeState(registry.db)
        self.job_store = JobStore(registry.db)
        self.ledger = PrivacyLedger(registry.db)
        self.queries = QueryLedger(registry.db)
        self.trainer = trainer or Trainer(settings.train_threads, sandbox_policy(settings),
                                          secret_dirs=[settings.node_dir, settings.bundle],
                                          max_processes=settings.max_training_processes)
        self.log = structlog.get_logger("node").bind(node=self.name)
        self.trainer.on_started = self._training_started
        self.messenger = Messenger(  # tensors stay numpy in the node: only training processes import torch
            identity, settings.mqtt, will=(topics.status(self.name), "node_status", NodeStatus(state="offline")),
            torch_tensors=False,
        )
        self.jobs: dict[str, _Job] = {}
        self.parked: dict[str, _Parked] = {}
        self.pending: dict[tuple[str, int], _Pending] = {}
        self.secure = SecureRounds(self.name, self._send_secagg)  # node/secagg.py
        self._early_models: OrderedDict[str, Message] = OrderedDict()
        # statistics run one at a time, with a short bounded queue: a flood of requests cannot
        # start a thread each (and each its own copy of the data)
        self._stats_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fbm-node-stats")
        self._stats_pending = 0
        self.bindings = JobBindings(self.state, audit, self.log)  # job -> the one aggregator it follows
        self._lock = threading.Lock()
        self._tasks: queue.Queue[_Task | _JobOver | None] = queue.Queue()
        self._stop = threading.Event()
        self._train_thread = threading.Thread(target=self._train_loop, name="fbm-node-train", daemon=True)
        self._resend_thread = threading.Thread(target=self._resend_loop, name="fbm-node-resend", daemon=True)
        self._plans_thread = threading.Thread(target=self._plans_loop, name="fbm-node-plans", daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, connect_timeout_s: float | None = None) -> None:
        """Connect at once; the training template (torch imported, no key, dataset or plan)
        starts once connected, on the training thread (a round that arrives first waits for
        it): the node process itself imports no torch, so a site is online in well under 1 s."""
        self._resume_jobs()  # before subscribing: a model delivered at once finds its job
        m = self.messenger
        # Bulk at QoS 0: the broker never queues a job or model per offline node; the retained
        # copies arrive when we (re)subscribe. Control messages below stay QoS 1 in our session.
        m.subscribe(topics.every("job"), self._on_job, types={"job"}, retained_chunks=True, on_clear=self._on_job_cleared, qos=0)
        m.subscribe(topics.every("model"), self._on_model, types={"model"}, retained_chunks=True, qos=0)
        m.subscribe(topics.every("secagg"), self._on_secagg_state, types={"secagg_state"}, retained_chunks=True, qos=0)
        # no subscription to the jobs' events topics: a job's end is in its model (status), and
        # acks come on our own topic; every node reading every event would be O(N^2) a round
        m.subscribe(topics.requests(self.name), self._on_request, types={"request", "update_received"})
        m.on_reject(self._on_rejected)
        m.on_connected(self._on_connected)
        m.connect(connect_timeout_s)
        self._train_thread.start()  # after connecting: the template's torch import does not delay it
        self._resend_thread.start()
        self._plans_thread.start()
        self.audit.record("node_started", actor=self.name)
        self.log.info("node_started", datasets=[d.name for d in self.registry.list()])

    def stop(self) -> None:
        """Stop cleanly, also when start() was interrupted half-way (SIGTERM during start-up)."""
        self._stop.set()
        self.trainer.begin_close()
        self._tasks.put(None)
        if self.messenger.transport.connected:
            try:
                self.messenger.send(topics.status(self.name), "node_status", NodeStatus(state="offline"), retain=True,
                                    timeout_s=5)
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                self.log.warning("offline_status_not_sent", error=str(exc))
        self.messenger.close()
        for thread in (self._train_thread, self._resend_thread, self._plans_thread):
            if thread.is_alive():
                thread.join(timeout=10)
        self.trainer.stop()
        self._stats_pool.shutdown(wait=False, cancel_futures=True)
        self.beat(connected=False)
        self.audit.record("node_stopped", actor=self.name)

    def _resume_jobs(self) -> None:
        """Take back the jobs this node held before it stopped, from its own database (the
        broker may have lost their retained specs); each signature is checked again."""
        for stored in self.job_store.all():
            try:
                msg = open_envelope(stored.wire, self.messenger.trust, topics.job(stored.job_id), torch_tensors=False)
                dataset = self.registry.get(stored.dataset)
                if msg.type != "job" or msg.body.job_id != stored.job_id or dataset is None:  # type: ignore[attr-defined]
                    raise ValueError("its dataset is gone or the stored message is not this job")
            except (BadMessage, ValueError) as exc:
                self.log.warning("job_not_resumed", job=stored.job_id, reason=str(exc))
                self.audit.record("job_not_resumed", job=stored.job_id, reason=str(exc))
                self.job_store.forget(stored.job_id)
                continue
            spec: JobSpec = msg.body  # type: ignore[assignment]
            with self._lock:
                if stored.state == "accepted":
                    self.jobs[spec.job_id] = _Job(spec, dataset)
                else:
                    self.parked[spec.job_id] = _Parked(spec, dataset, stored.sender, msg.id, wire=stored.wire)
            self.audit.record("job_resumed", job=spec.job_id, dataset=dataset.name, state=stored.state)
            self.log.info("job_resumed", job=spec.job_id, state=stored.state)

    def _hold_early_model(self, job_id: str, msg: Message) -> None:
        """A model whose job is not known (yet): kept, latest per job, for when the job arrives."""
        self._early_models.pop(job_id, None)
        self._early_models[job_id] = msg
        while len(self._early_models) > EARLY_MODELS:
            self._early_models.popitem(last=False)

    def _replay_early_model(self, job_id: str) -> None:
        with self._lock:
            early = self._early_models.pop(job_id, None)
        if early is not None:
            self._on_model(early)

    def _resend_soon(self, pending: _Pending) -> None:
        """Re-send one unacknowledged update now, off the delivery thread (it waits for PUBACK)."""
        def resend() -> None:
            try:
                self._send_update(pending)
                self.log.info("update_resent", job=pending.job, round=pending.round, why="model_republished")
            except Exception as exc:  # noqa: BLE001 - the resend loop tries again
                self.log.warning("update_resend_failed", job=pending.job, round=pending.round, error=str(exc))

        threading.Thread(target=resend, name="fbm-node-resend-now", daemon=True).start()

    def _on_connected(self, session_present: bool) -> None:
        self.publish_status()
        self.resend_pending(force=True)  # what was in flight when the link or the broker went down
        self.secure.resend()

    def publish_status(self) -> None:
        status = NodeStatus(
            state="online",
            datasets=[d.public() for d in self.registry.list()],
            version=VERSION,
            jobs=sorted(self.jobs),
        )
        self.messenger.set_will(topics.status(self.name), "node_status", NodeStatus(state="offline"))
        self.messenger.send(topics.status(self.name), "node_status", status, retain=True)

    # --- jobs ---------------------------------------------------------------------------------

    def _reply(self, command: str, *, job: str | None = None, ok: bool = True, error: str = "",
               in_reply_to: str = "", data: dict[str, Any] | None = None) -> None:
        self.messenger.send(
            topics.replies(self.name), "reply",
            Reply(command=command, in_reply_to=in_reply_to, ok=ok, error=error, data=data or {}),
            job=job,
        )

    def _decline(self, job_id: str, reason: str, msg: Message | None = None) -> None:
        """Refuse a job (when it arrives, or later when its plan is rejected) and say why."""
        self.log.info("job_declined", job=job_id, reason=reason)
        self.audit.record("job_refused", job=job_id, actor=msg.sender if msg else None, reason=reason)
        self._reply("job", job=job_id, ok=False, error=reason, in_reply_to=msg.id if msg else "",
                    data={"job": job_id, "status": "declined"})

    def _plan_refusal(self, spec: JobSpec, status: PlanStatus) -> str:
        return f"plan {plan_id(spec.plan)[:16]} was {status} by the admin of node {self.name}"

    def _on_job(self, msg: Message) -> None:
        spec: JobSpec = msg.body  # type: ignore[assignment]
        if spec.job_id != topics.job_of(msg.topic):
            self._decline(spec.job_id, "job id does not match its topic", msg)
            return
        with self._lock:
            if spec.job_id in self.jobs or spec.job_id in self.parked:
                return
        if spec.nodes is not None and self.name not in spec.nodes:
            self.audit.record("job_not_selected", job=spec.job_id, actor=msg.sender)
            return
        try:
            check_ref(spec.plan)
            algorithm = algorithm_of(spec.training_args)
        except (PlanError, LocalError) as exc:
            self._decline(spec.job_id, f"plan refused: {exc}", msg)
            return
        if (refusal := secure_refusal(spec)) is not None:  # options it cannot honour: fail closed
            self._decline(spec.job_id, refusal, msg)
            return
        if (over := cap_refusal(spec, self.settings)) is not None:  # node/caps.py
            self._decline(spec.job_id, over, msg)
            return
        try:
            CompressionSpec.of(spec.training_args)
        except ValidationError as exc:
            self._decline(spec.job_id, f"invalid training_args.compression: {exc.errors()[0]['msg']}", msg)
            return
        if spec.plan.zoo is not None and algorithm not in ZOO_ALGORITHMS[spec.plan.zoo]:
            self._decline(spec.job_id, f"zoo plan {spec.plan.zoo!r} cannot run the {algorithm!r} local algorithm", msg)
            return
        matches = self.registry.matching(spec.tags)
        if not matches:
            self._decline(spec.job_id, f"no dataset with tags {sorted(spec.tags)} on node {self.name}", msg)
            return
        refusal = self._privacy_refusal(spec, matches[0])
        if refusal is not None:
            self._decline(spec.job_id, refusal, msg)
            return
        status = self.plan_status(spec)
        if status in (PlanStatus.REJECTED, PlanStatus.REVOKED):
            self._decline(spec.job_id, self._plan_refusal(spec, status), msg)
        elif status != PlanStatus.APPROVED:
            self._park(_Parked(spec, matches[0], msg.sender, msg.id, wire=msg.wire))
        else:
            self._accept(spec, matches[0], msg.sender, msg.id, msg.wire)

    def _privacy_refusal(self, spec: JobSpec, dataset: Dataset) -> str | None:
        """The site's privacy policy for `dataset` against what the job asks, budget included."""
        policy = self.settings.privacy.for_dataset(dataset.name)
        try:
            ask = job_ask(spec.rounds, spec.quorum, spec.training_args)
        except (TypeError, ValueError, KeyError) as exc:
            return f"privacy policy: training_args not understood ({exc})"
        rows = dataset.public().n_samples
        refusal = policy_refusal(policy, ask, rows) or self._dp_sgd_refusal(spec, ask)
        if refusal is not None or policy.epsilon_budget is None or ask.dp_sigma is None:
            return refusal
        if self.ledger.of_job(dataset.name, spec.job_id) is not None:
            return None  # already reserved (the job came again, e.g. after a restart)
        cost = job_epsilon(ask, rows, policy.delta)
        spent = self.ledger.spent(dataset.name).epsilon
        if spent + cost > policy.epsilon_budget:
            return (f"privacy policy: the job would spend epsilon {cost:.3g} (delta {policy.delta:g}) on dataset "
                    f"{dataset.name}; {max(policy.epsilon_budget - spent, 0):.3g} of its budget "
                    f"{policy.epsilon_budget:g} is left")
        return None

    @staticmethod
    def _dp_sgd_refusal(spec: JobSpec, ask: JobAsk) -> str | None:
        """DP-SGD needs a model Opacus can train: a zoo plan's model is checked here (zoo code is
        the node's own); a submitted plan's model is built only in its confined process, which
        refuses the round with Opacus' reason."""
        if ask.dp_mode != "sample":
            return None
        if importlib.util.find_spec("opacus") is None:
            return "DP-SGD: this node cannot run it (opacus is not installed: pip install 'fedbiomq[dp]')"
        if spec.plan.zoo is None:
            return None
        from opacus.validators import ModuleValidator  # torch: DP-SGD jobs on zoo plans only

        from common.training.zoo import ZOO

        try:
            model = ZOO[spec.plan.zoo](spec.model_args, spec.training_args).build_model()
            errors = ModuleValidator.validate(model, strict=False)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built is refused, not fatal
            return f"DP-SGD: zoo plan {spec.plan.zoo!r} cannot build its model ({exc})"
        return f"DP-SGD: Opacus cannot train zoo plan {spec.plan.zoo!r}: {errors[0]}" if errors else None

    def _reserve_privacy(self, spec: JobSpec, dataset: Dataset) -> dict[str, float | str]:
        """Record the job's spend on the dataset's budget when it is accepted; what to tell."""
        policy = self.settings.privacy.for_dataset(dataset.name)
        ask = job_ask(spec.rounds, spec.quorum, spec.training_args)
        if ask.dp_sigma is None:
            return {}
        cost = job_epsilon(ask, dataset.public().n_samples, policy.delta)
        self.ledger.reserve(dataset.name, spec.job_id, cost, policy.delta)
        self.audit.record("privacy_spent", job=spec.job_id, dataset=dataset.name, epsilon=cost, delta=policy.delta,
                          mode=ask.dp_mode)
        info: dict[str, float | str] = {"epsilon": cost, "delta": policy.delta, "mode": ask.dp_mode or "client"}
        if policy.epsilon_budget is not None:
            info["epsilon_left"] = policy.epsilon_budget - self.ledger.spent(dataset.name).epsilon
        return info

    def plan_status(self, spec: JobSpec) -> PlanStatus | None:
        """This node's decision on the job's plan (zoo plans may be trusted by config)."""
        zoo_trusted = self.settings.privacy.zoo_plans
        if spec.plan.zoo is not None and self.settings.trust_zoo_plans and (
                zoo_trusted is None or spec.plan.zoo in zoo_trusted):
            return PlanStatus.APPROVED
        return self.plans.status(plan_id(spec.plan))

    def _accept(self, spec: JobSpec, dataset: Dataset, sender: str, msg_id: str,
                wire: bytes | bytearray | memoryview) -> None:
        with self._lock:
            if spec.job_id in self.jobs:
                return
            self.jobs[spec.job_id] = _Job(spec, dataset)
        self.job_store.keep(spec.job_id, "accepted", dataset.name, sender, wire)
        privacy = self._reserve_privacy(spec, dataset)
        self.audit.record("job_accepted", job=spec.job_id, dataset=dataset.name, plan_sha256=plan_id(spec.plan), actor=sender)
        self.log.info("job_accepted", job=spec.job_id, dataset=dataset.name)
        self._reply("job", job=spec.job_id, in_reply_to=msg_id,
                    data={"job": spec.job_id, "status": "accepted", "dataset": dataset.name,
                          "n_samples": dataset.public().n_samples, **({"privacy": privacy} if privacy else {})})
        self.publish_status()
        self._replay_early_model(spec.job_id)

    def _park(self, parked: _Parked) -> None:
        """Keep the job until the admin decides on its plan; the researcher is told it waits."""
        spec = parked.spec
        stored = self.plans.record_seen(spec.plan, spec.job_id, parked.sender)
        with self._lock:
            if spec.job_id in self.parked:
                return
            self.parked[spec.job_id] = parked
        self.job_store.keep(spec.job_id, "parked", parked.dataset.name, parked.sender, parked.wire)
        pid = stored.plan_id
        self.audit.record("job_pending", job=spec.job_id, plan_sha256=pid, actor=parked.sender, dataset=parked.dataset.name)
        self.log.info("job_pending_plan_approval", job=spec.job_id, plan=pid)
        self._reply("job", job=spec.job_id, ok=False, in_reply_to=parked.msg_id,
                    error=f"pending: plan {pid[:16]} awaits approval by the admin of node {self.name} "
                          f"(`fbm-node plan approve {pid[:16]}`)",
                    data={"job": spec.job_id, "status": "pending", "plan": pid})

    def review_plans(self) -> None:
        """Act on the admin's decisions: start parked jobs whose plan was approved, drop the
        parked or running jobs whose plan was rejected or revoked."""
        with self._lock:
            parked = list(self.parked.values())
            running = [j.spec for j in self.jobs.values()]
        for p in parked:
            status = self.plan_status(p.spec)
            if status == PlanStatus.PENDING or status is None:
                continue
            with self._lock:
                self.parked.pop(p.spec.job_id, None)
            if status == PlanStatus.APPROVED:
                self._accept(p.spec, p.dataset, p.sender, p.msg_id, p.wire)
                if p.model is not None:
                    self._on_model(p.model)
            else:
                self.job_store.forget(p.spec.job_id)
                self._decline(p.spec.job_id, self._plan_refusal(p.spec, status))
        for spec in running:
            status = self.plan_status(spec)
            if status in (PlanStatus.REJECTED, PlanStatus.REVOKED):
                with self._lock:
                    self.jobs.pop(spec.job_id, None)
                    self._drop_pending(spec.job_id)
                self.job_store.forget(spec.job_id)
                self._tasks.put(_JobOver(spec.job_id))
                self._decline(spec.job_id, self._plan_refusal(spec, status))
                self.publish_status()

    def _plans_loop(self) -> None:
        self.beat()
        while not self._stop.wait(self.settings.plan_poll_s):
            try:
                self.review_plans()
                self.beat()
            except Exception:  # noqa: BLE001 - the next tick tries again
                self.log.exception("plan_review_failed")

    def beat(self, connected: bool | None = None) -> None:
        """Tell the web console (through the database) that this process lives and how it is linked."""
        with self._lock:
            jobs = sorted(self.jobs)
        link = self.messenger.transport.connected if connected is None else connected
        self.state.beat(link, f"{self.messenger.transport.host}:{self.messenger.transport.port}", jobs)

    def _drop_pending(self, job: str, before_round: int | None = None) -> None:
        """Forget unacknowledged updates of `job` (of rounds before `before_round`, if given)."""
        for key in [k for k in self.pending if k[0] == job and (before_round is None or k[1] < before_round)]:
            del self.pending[key]

    def _on_job_cleared(self, topic: str) -> None:
        job = topics.job_of(topic)
        with self._lock:
            if job:
                self._drop_pending(job)
            removed = (self.jobs.pop(job, None) or self.parked.pop(job, None)) if job else None
        if job:
            self.job_store.forget(job)
            self.secure.forget(job)
        if removed:
            self._tasks.put(_JobOver(job))
            self.audit.record("job_withdrawn", job=job)
            self.log.info("job_withdrawn", job=job)

    def _job_spec(self, job_id: str) -> JobSpec | None:
        with self._lock:
            known = self.jobs.get(job_id) or self.parked.get(job_id)
        return known.spec if known is not None else None

    def _from_bound_aggregator(self, msg: Message, job_id: str) -> bool:
        """Whether a model or an ack for `job_id` comes from the job's aggregator (see
        node/binding.py for the rule). Messages for jobs this node neither runs nor waits on
        are ignored anyway, so they bind nothing."""
        spec = self._job_spec(job_id)
        return spec is not None and self.bindings.accepts(job_id, spec.aggregator.identity, msg.sender, msg.type)

    def _on_ack(self, msg: Message) -> None:
        """The aggregator holds our update in a checkpoint: stop re-sending it."""
        if not self._from_bound_aggregator(msg, msg.job or ""):
            return
        if msg.body.node == self.name:
            with self._lock:
                acked = self.pending.pop((msg.job or "", msg.body.round), None)
            if acked is not None:
                self.log.debug("update_acknowledged", job=msg.job, round=msg.body.round)

    def _job_ended(self, job_id: str, status: str, sender: str) -> None:
        """The job is done or failed (its model says so): forget it and what we owe it."""
        with self._lock:
            self._drop_pending(job_id)
            self.parked.pop(job_id, None)
            job = self.jobs.pop(job_id, None)
        self.job_store.forget(job_id)
        self.secure.forget(job_id)
        if job is not None:
            self._tasks.put(_JobOver(job_id))
            event = f"job_{status}"
            self.audit.record(event, job=job_id, actor=sender)
            self.log.info(event, job=job_id)
            self.publish_status()

    def _on_model(self, msg: Message) -> None:
        model = msg.body
        job_id = topics.job_of(msg.topic)
        if not self._from_bound_aggregator(msg, job_id or ""):
            return
        if model.status in ("done", "failed"):
            self._job_ended(job_id or "", model.status, msg.sender)
            return
        with self._lock:
            job = self.jobs.get(job_id or "")
            if job is None:
                if job_id in self.parked:
                    self.parked[job_id].model = msg  # joins this round if approved in time
                else:
                    self._hold_early_model(job_id or "", msg)
                return
            if model.status != "running" or model.open_round is None:
                self._drop_pending(job_id)  # type: ignore[arg-type]
                return
            r = model.open_round
            self._drop_pending(job_id, before_round=r)  # type: ignore[arg-type]  # closed rounds
            if is_selective(model.selection) and self.name not in model.nodes:
                return  # not selected for this round
            # A node that was away (or started late) joins the round that is open now.
            if r in job.trained:
                unacked = self.pending.get((job_id, r))  # type: ignore[arg-type]
                if unacked is not None:  # the model again (a resumed aggregator): re-send at once
                    self._resend_soon(unacked)
                return
            job.trained.add(r)
        if job.spec.secure_aggregation is not None:  # outside the lock: it may answer the key stage
            self.secure.open(job.spec, r, model.params)
            if (early := self.secure.take_early(job_id or "")) is not None:
                self._on_secagg_state(early)
        self._tasks.put(_Task(job_id, r, model.params, time.monotonic(), dict(model.extra)))  # type: ignore[arg-type]

    # --- training -----------------------------------------------------------------------------

    def _prepare_training(self) -> None:
        """Warm a spare training process (torch imported), so the first job does not wait for it."""
        try:
            self.trainer.start()
        except TrainingFailed as exc:  # each job's first round starts a process of its own
            self.log.error("training_process_not_started", error=str(exc))
            return
        self.audit.record("training_ready", actor=self.name, max_processes=self.trainer.max_processes)
        self.log.info("training_ready")

    def _training_started(self, job: str, pid: int, sandbox: dict[str, Any]) -> None:
        """A job got its own training process: what it may touch goes into the audit trail."""
        self.audit.record("training_process_started", job=job, actor=self.name, pid=pid, sandbox=sandbox)

    def _train_loop(self) -> None:
        self._prepare_training()
        while not self._stop.is_set():
            task = self._tasks.get()
            if task is None:
                return
            if isinstance(task, _JobOver):
                self.trainer.end_job(task.job)
                continue
            with self._lock:
                job = self.jobs.get(task.job)
            if job is None:
                continue
            try:
                self._train_round(job, task)
            except Exception as exc:  # noqa: BLE001 - the node stays up, the researcher is told
                self.log.exception("round_failed", job=task.job, round=task.round)
                self.audit.record("round_failed", job=task.job, round_=task.round, error=str(exc))
                try:
                    self._reply("train", job=task.job, ok=False, error=str(exc), data={"job": task.job, "round": task.round})
                except Exception:  # noqa: BLE001
                    self.log.exception("reply_failed")

    def _train_round(self, job: _Job, task: _Task) -> None:
        spec = job.spec
        log = self.log.bind(job=spec.job_id, round=task.round)
        wait_s = time.monotonic() - task.received_at
        work = {
            "job": spec.job_id,
            "round": task.round,
            "plan": spec.plan.model_dump(),
            "model_args": spec.model_args,
            "training_args": spec.training_args,
            "dataset": _dataset_spec(job.dataset),
            "params": task.params,
            "extra": task.extra,
            "local_state": job.local_state,
        }
        try:
            result = self.trainer.run(work, timeout_s=self.settings.round_timeout_s)
        except TrainingFailed as exc:
            log.warning("training_failed", error=str(exc))
            self.audit.record("round_failed", job=spec.job_id, round_=task.round, dataset=job.dataset.name, error=str(exc))
            self._reply("train", job=spec.job_id, ok=False, error=str(exc), data={"job": spec.job_id, "round": task.round})
            return
        timings = {**result["timings"], "wait_s": wait_s, "prev_send_s": job.last_send_s}
        job.local_state = result.get("local_state") or {}
        if spec.secure_aggregation is not None:
            self._secure_input(job, task, result)
            return
        params = result["params"]
        compression = CompressionSpec.of(spec.training_args)
        if compression.kind != "none":  # send the change, compressed; keep what was dropped for next round
            params, job.residual = encode_update(params, task.params, compression, job.residual)
        body = {"round": task.round, "params": params, "n_samples": result["n_samples"],
                "metrics": result["metrics"], "timings": timings, "dataset": job.dataset.name,
                "extra": result.get("extra") or {}}
        pending = _Pending(spec.job_id, task.round, body, uuid.uuid4().hex, time.monotonic())
        with self._lock:
            self.pending[(spec.job_id, task.round)] = pending
        sent = time.monotonic()
        try:
            self._send_update(pending)
        except TransportError as exc:  # the broker is away: kept, re-sent on reconnect
            log.warning("update_send_deferred", error=str(exc))
        job.last_send_s = time.monotonic() - sent
        self.audit.record("round_trained", job=spec.job_id, round_=task.round, dataset=job.dataset.name,
                          plan_sha256=spec.plan.sha256 or f"zoo:{spec.plan.zoo}", n_samples=result["n_samples"],
                          train_s=round(result["timings"]["train_s"], 3))
        log.info("update_sent", n_samples=result["n_samples"], train_s=round(result["timings"]["train_s"], 3),
                 train_loss=round(result["metrics"]["train_loss"], 4))

    def _secure_input(self, job: _Job, task: _Task, result: dict[str, Any]) -> None:
        """A secure job's trained update goes to its SiteRound (masked), never out in the clear;
        client-level DP noise, if any, was added by the training process before this."""
        spec = job.spec
        taken = self.secure.set_input(spec.job_id, task.round, as_params(result["params"]), result["n_samples"])
        self.audit.record("round_trained", job=spec.job_id, round_=task.round, dataset=job.dataset.name,
                          plan_sha256=spec.plan.sha256 or f"zoo:{spec.plan.zoo}", n_samples=result["n_samples"],
                          train_s=round(result["timings"]["train_s"], 3), secure_aggregation=taken)
        self.log.info("update_masked" if taken else "update_not_masked_round_gone", job=spec.job_id,
                      round=task.round, n_samples=result["n_samples"])

    def _send_secagg(self, topic: str, type_: str, body: Any) -> None:
        self.messenger.send(topic, type_, body, job=topics.job_of(topic), round_=body.round)

    def _on_secagg_state(self, msg: Message) -> None:
        """The aggregator's secure-aggregation stage for a job (retained): answer it."""
        job_id = topics.job_of(msg.topic) or ""
        if msg.topic != topics.secagg(job_id):
            return
        if self._job_spec(job_id) is None:  # the job (or its acceptance) comes later: kept for then
            self.secure.hold_early(job_id, msg)
            return
        if not self._from_bound_aggregator(msg, job_id):
            return
        self.secure.on_state(job_id, msg.body)  # type: ignore[arg-type]

    def _send_update(self, pending: _Pending) -> None:
        self.messenger.send(topics.update(pending.job, self.name), "update", pending.body,
                            job=pending.job, round_=pending.round, msg_id=pending.msg_id)

    def resend_pending(self, force: bool = False) -> None:
        """Re-send updates the aggregator has not acknowledged (same message id: no double count)."""
        now = time.monotonic()
        with self._lock:
            due = [p for p in self.pending.values() if force or now - p.sent_at >= self.settings.resend_after_s]
            for p in due:
                self.pending[(p.job, p.round)] = _Pending(p.job, p.round, p.body, p.msg_id, now)
        for p in due:
            try:
                self._send_update(p)
                self.log.info("update_resent", job=p.job, round=p.round)
            except Exception as exc:  # noqa: BLE001 - next tick tries again
                self.log.warning("update_resend_failed", job=p.job, round=p.round, error=str(exc))

    def _resend_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.settings.resend_after_s / 4)):
            if self.messenger.transport.connected:
                self.resend_pending()

    # --- requests -----------------------------------------------------------------------------

    def _on_request(self, msg: Message) -> None:
        if msg.type == "update_received":
            self._on_ack(msg)
            return
        command = msg.body.command
        self.audit.record("request", actor=msg.sender, command=command)
        if command == "ping":
            self._reply("ping", in_reply_to=msg.id, data={"pong": True, "version": VERSION})
        elif command == "statistics":
            self._queue_statistics(msg)
        elif command == "plan_status":
            self._reply(command, in_reply_to=msg.id, data=self._plan_status_data(msg.body.args))
        elif command in ("list_datasets", "search"):
            tags = msg.body.args.get("tags") or []
            found = self.registry.matching(list(tags)) if tags else self.registry.list()
            self._reply(command, in_reply_to=msg.id, data={"datasets": [d.public().model_dump() for d in found]})
        else:
            self._reply(command, in_reply_to=msg.id, ok=False, error=f"unknown command {command!r}")

    def _refuse_statistics(self, msg: Message, reason: str) -> None:
        self.audit.record("statistics_refused", actor=msg.sender, reason=reason, tags=msg.body.args.get("tags"))
        self._reply("statistics", in_reply_to=msg.id, ok=False, error=reason)

    def _queue_statistics(self, msg: Message) -> None:
        """Refuse at once what the policy forbids or what the queue cannot take; queue the rest."""
        policy = self.settings.statistics
        try:
            check_request(policy, int(msg.body.args.get("bins") or 0), msg.body.args.get("ranges"))
        except (StatisticsRefused, ValueError, TypeError) as exc:
            self._refuse_statistics(msg, str(exc))
            return
        with self._lock:
            busy = self._stats_pending > policy.max_pending
            if not busy:
                self._stats_pending += 1
        if busy:
            self._refuse_statistics(msg, f"node {self.name} is busy with {policy.max_pending} statistics requests; "
                                         "ask again later")
            return
        self._stats_pool.submit(self._statistics, msg)

    def _statistics(self, msg: Message) -> None:
        """Federated analytics: sufficient statistics of the dataset with the asked tags."""
        try:
            self._compute_statistics(msg)
        finally:
            with self._lock:
                self._stats_pending -= 1

    def _compute_statistics(self, msg: Message) -> None:
        """The dataset's query budget is checked here, the data read in a confined child, and
        its answer checked (node.answers) before anything is sent."""
        args = msg.body.args
        tags = list(args.get("tags") or [])
        matches = self.registry.matching(tags) if tags else []
        policy = self.settings.statistics
        try:
            if not matches:
                raise StatisticsRefused(f"no dataset with tags {sorted(tags)} on node {self.name}")
            ds = matches[0]
            if self.queries.in_last_day(ds.name) >= policy.max_queries:
                raise StatisticsRefused(f"statistics query budget: dataset {ds.name} on node {self.name}: its "
                                        f"{policy.max_queries} statistics queries for today are spent; ask again later")
            task = {"dataset": _dataset_spec(ds), "min_rows": self.settings.min_statistics_rows,
                    "bins": int(args.get("bins") or 0), "ranges": args.get("ranges"), "policy": policy.model_dump()}
            stats, pid, paths, sandbox = self.trainer.statistics(task, policy, self.settings.round_timeout_s)
        except (StatisticsRefused, TrainingFailed, ValueError, TypeError) as exc:
            self._refuse_statistics(msg, str(exc))
            return
        self.queries.record(ds.name, msg.sender)
        self.audit.record("statistics_sent", actor=msg.sender, dataset=ds.name, rows=stats["n"], pid=pid,
                          confined_to=paths, landlock_abi=sandbox.get("landlock_abi"),
                          queries_today=self.queries.in_last_day(ds.name))
        self._reply("statistics", in_reply_to=msg.id, data={"dataset": ds.name, **stats})

    def _plan_status_data(self, args: dict[str, Any]) -> dict[str, Any]:
        """A researcher asks whether a plan (sha256 or `zoo:NAME`) would run here."""
        pid = str(args.get("plan", ""))
        zoo_trusted = self.settings.privacy.zoo_plans
        if pid.startswith("zoo:") and self.settings.trust_zoo_plans and (zoo_trusted is None or pid[4:] in zoo_trusted):
            return {"plan": pid, "status": "approved", "note": "zoo plans are trusted by this node's config"}
        stored = self.plans.get(pid)
        if stored is None:
            return {"plan": pid, "status": "unknown", "note": "never seen: a job with it would wait for approval"}
        return {"plan": pid, "status": str(stored.status), "note": stored.note}

    def _on_rejected(self, topic: str, exc: BadMessage) -> None:
        """A malformed job is refused out loud, so its researcher learns why."""
        job = topics.job_of(topic)
        if job is None or topic != topics.job(job):
            return
        self.audit.record("job_refused", job=job, reason=str(exc))
        try:
            self._reply("job", job=job, ok=False, error=f"job refused: {exc}", data={"job": job})
        except Exception:  # noqa: BLE001
            self.log.exception("reply_failed")
