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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from common import topics
from common.compression import CompressionSpec, encode_update
from common.envelope import Message, open_envelope
from common.errors import BadMessage, Reason, TransportError
from common.identity import Identity
from common.messages import JobAnswer, JobKey, JobSpec, NodeStatus, Reply, TrainFailed
from common.messenger import Messenger
from common.training.args import TrainingArgs, TrainingArgsError
from common.training.catalog import ZOO_ALGORITHMS, LocalError, algorithm_of
from common.training.loader import PlanError, check_ref
from node import jobs as site
from node.accountant import job_epsilon
from node.audit import AuditTrail
from node.binding import JobBindings
from node.caps import cap_refusal
from node.config import NodeSettings
from node.job_store import JobStore
from node.jobs import Job, Lookups, Parked, Pending, SiteJobs
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
ENDED = "job_ended:"  # node_state key prefix: jobs that ended here (done, failed, withdrawn)


def sandbox_policy(settings: NodeSettings) -> SandboxPolicy:
    return SandboxPolicy(memory_mb=settings.train_memory_mb, file_size_mb=settings.train_file_size_mb,
                         landlock=settings.sandbox)


def _dataset_spec(ds: Dataset) -> dict[str, Any]:
    """What the training child needs to load a dataset (its path stays on this machine); the
    sample count bounds the one a training answer may claim."""
    return {"type": ds.type, "path": ds.path, "target": ds.target, "labels": ds.labels, "name": ds.name,
            "labels_found": ds.meta.get("labels"), "n_samples": ds.public().n_samples or None}


@dataclass(frozen=True)
class _JobOver:
    """Tells the training thread a job ended: its training process ends too."""

    job: str


@dataclass(frozen=True)
class _Prepare:
    """Tells the training thread a job was accepted: fork its training process before its first model."""

    job: str
    dataset: dict[str, Any]


_Task = site.Train  # the training thread's work: the round SiteJobs decided to train


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
                                          secret_dirs=[settings.node_dir, settings.bundle,
                                                       *filter(None, [settings.training_template])],
                                          max_processes=settings.max_training_processes,
                                          template_dir=settings.training_template)
        self.log = structlog.get_logger("node").bind(node=self.name)
        self.trainer.on_started = self._training_started
        self.messenger = Messenger(  # processed message ids survive a restart: a replay is dropped
            identity, settings.mqtt, will=(topics.status(self.name), "node_status", NodeStatus(state="offline")),
            seen_file=settings.node_dir / "seen.sqlite",
            torch_tensors=False,  # tensors stay numpy in the node: only training processes import torch
        )
        # the decisions on jobs (node/jobs.py): one step at a time, under self._lock
        self.site = SiteJobs(self.name, Lookups(refusal=self._spec_refusal, datasets=registry.matching,
                                                privacy_refusal=self._privacy_refusal, plan_status=self.plan_status),
                             resend_after_s=settings.resend_after_s)
        self.secure = SecureRounds(self.name, self._send_secagg)  # node/secagg.py
        # statistics run one at a time, with a short bounded queue: a flood of requests cannot
        # start a thread each (and each its own copy of the data)
        self._stats_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fbm-node-stats")
        self._stats_pending = 0
        self.bindings = JobBindings(self.state, audit, self.log)  # job -> the one aggregator it follows
        self._lock = threading.Lock()
        self._tasks: queue.Queue[_Task | _JobOver | _Prepare | None] = queue.Queue()
        self._stop = threading.Event()
        self._train_thread = threading.Thread(target=self._train_loop, name="fbm-node-train", daemon=True)
        self._resend_thread = threading.Thread(target=self._resend_loop, name="fbm-node-resend", daemon=True)
        self._plans_thread = threading.Thread(target=self._plans_loop, name="fbm-node-plans", daemon=True)

    @property
    def jobs(self) -> dict[str, Job]:
        return self.site.jobs

    @property
    def parked(self) -> dict[str, Parked]:
        return self.site.parked

    @property
    def pending(self) -> dict[tuple[str, int], Pending]:
        return self.site.pending

    def _step(self, event: Any, *args: Any) -> None:
        """One decision (a SiteJobs method) under the lock, then its actions in order, outside it."""
        with self._lock:
            actions = event(*args)
        for action in actions:
            self._perform(action)

    def _perform(self, action: site.Action) -> None:
        match action:
            case site.Accept():
                self._accept(action.spec, action.dataset, action.sender, action.msg_id, action.wire)
            case site.Park():
                self._park(action.parked)
            case site.Decline():
                self._decline(action.job, action.reason, sender=action.sender, msg_id=action.msg_id, owner=action.owner)
            case site.Record():
                self.audit.record(action.event, job=action.job, actor=action.actor)
                self.log.info(action.event, job=action.job)
            case site.Forget():
                self._forget(action)
            case site.PublishStatus():
                self.publish_status()
            case site.Replay():
                self._on_model(action.msg)
            case site.Train():
                self._queue_round(action)
            case site.Resend():
                self._resend_soon(action.pending, action.why)
            case site.Acked():
                self.log.debug("update_acknowledged", job=action.job, round=action.round)

    def _forget(self, action: site.Forget) -> None:
        self.job_store.forget(action.job)
        if action.ended:
            self._remember_end(action.job, action.ended)
        if action.secure:
            self.secure.forget(action.job)
        if action.training:
            self._tasks.put(_JobOver(action.job))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, connect_timeout_s: float | None = None) -> None:
        """Connect at once; the training template (torch imported, no key, dataset or plan)
        starts once connected, on the training thread (a round that arrives first waits for
        it): the node process itself imports no torch, so a site is online in well under 1 s."""
        self._resume_jobs()  # before subscribing: a model delivered at once finds its job
        m = self.messenger
        # Bulk at QoS 0: the broker never queues a job or model per offline node; the retained
        # copies arrive when we (re)subscribe. Control messages below stay QoS 1 in our session.
        m.subscribe(topics.every("job"), self._on_job, types={"job", "withdraw"}, retained_chunks=True, qos=0)
        # claims before models: a take-over's claim comes before the new aggregator's model
        m.subscribe(topics.every("claim"), self.bindings.on_claim, types={"job_claim"}, qos=0)
        m.subscribe(topics.every("model"), self._on_model, types={"model"}, retained_chunks=True, qos=0)
        m.subscribe(topics.every("secagg"), self._on_secagg_state, types={"secagg_state"}, retained_chunks=True, qos=0)
        # no subscription to the jobs' events topics: a job's end is in its model (status), and
        # acks come on our own topic; every node reading every event would be O(N^2) a round
        m.subscribe(topics.requests(self.name), self._on_request, types={"request", "update_received", "job_key"})
        m.hold_sealed(topics.every("job"))  # a job sealed before we joined: its aggregator may give us the key
        m.hold_sealed(topics.every("model"))  # a model for many nodes: its aggregator gives us its key once
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
                msg = open_envelope(stored.wire, self.messenger.trust, topics.job(stored.sender, stored.job_id),
                                    keyring=self.messenger.keyring, torch_tensors=False)
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
                self.site.resume(spec, dataset, stored.state, stored.sender, msg.id, stored.wire)
            self.audit.record("job_resumed", job=spec.job_id, dataset=dataset.name, state=stored.state)
            self.log.info("job_resumed", job=spec.job_id, state=stored.state)

    def _resend_soon(self, pending: Pending, why: str = "model_republished") -> None:
        """Re-send one unacknowledged update now, off the delivery thread (it waits for PUBACK)."""
        def resend() -> None:
            try:
                self._send_update(pending)
                self.log.info("update_resent", job=pending.job, round=pending.round, why=why)
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
            jobs=self._job_ids(),
        )
        self.messenger.set_will(topics.status(self.name), "node_status", NodeStatus(state="offline"))
        self.messenger.send(topics.status(self.name), "node_status", status, retain=True)

    # --- jobs ---------------------------------------------------------------------------------

    def _reply(self, command: str, *, to: str, job: str | None = None, ok: bool = True, error: str = "",
               in_reply_to: str = "", data: dict[str, Any] | None = None) -> None:
        """Answer `to` (who asked; for a notice about a job, its owner) on its own reply topic."""
        self.messenger.send(
            topics.replies(self.name, to), "reply",
            Reply(command=command, in_reply_to=in_reply_to, ok=ok, error=error, data=data or {}),
            job=job,
        )

    def _send_reply(self, reply: Reply, job: str, to: str) -> None:
        """A typed answer about a job (`JobAnswer`, `TrainFailed`) to `to` (its owner, or who asked)."""
        self.messenger.send(topics.replies(self.name, to), "reply", reply, job=job)

    def _decline(self, job_id: str, reason: str, msg: Message | None = None, *, sender: str | None = None,
                 msg_id: str = "", owner: str = "") -> None:
        """Refuse a job (when it arrives, or later when its plan is rejected) and say why, to
        its owner (who submitted it)."""
        sender, msg_id = (msg.sender, msg.id) if msg is not None else (sender, msg_id)
        self.log.info("job_declined", job=job_id, reason=reason)
        self.audit.record("job_refused", job=job_id, actor=sender, reason=reason)
        reply = JobAnswer(job=job_id, status="declined").reply(in_reply_to=msg_id, error=reason)
        self._send_reply(reply, job_id, owner or sender or "")

    def _on_job(self, msg: Message) -> None:
        """A job, or its withdrawal. The messenger checked owner == signer == the topic's owner
        (or, for a withdrawal, an admin signer); the decision is the site's (`SiteJobs.on_job`)."""
        if msg.type == "withdraw":
            self._on_withdrawal(msg)
            return
        spec: JobSpec = msg.body  # type: ignore[assignment]
        if self._foreign(msg, spec.job_id) or self._ended(msg, spec):
            return
        self._step(self.site.on_job, msg)

    def _spec_refusal(self, spec: JobSpec) -> str | None:
        """Why this node's code, config or caps cannot run the job as specified, or None."""
        try:
            check_ref(spec.plan)
            algorithm = algorithm_of(spec.training_args)
        except (PlanError, LocalError) as exc:
            return f"plan refused: {exc}"
        if (refusal := secure_refusal(spec)) is not None:  # options it cannot honour: fail closed
            return refusal
        if (over := cap_refusal(spec, self.settings)) is not None:  # node/caps.py
            return over
        try:
            CompressionSpec.of(spec.training_args)
        except ValidationError as exc:
            return f"invalid training_args.compression: {exc.errors()[0]['msg']}"
        try:
            TrainingArgs.of(spec.training_args)
        except TrainingArgsError as exc:
            return str(exc)
        if spec.plan.zoo is not None and algorithm not in ZOO_ALGORITHMS[spec.plan.zoo]:
            return f"zoo plan {spec.plan.zoo!r} cannot run the {algorithm!r} local algorithm"
        return None

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
        """The job is accepted (SiteJobs holds it): keep it, reserve its privacy spend, say so."""
        self.job_store.keep(spec.job_id, "accepted", dataset.name, sender, wire)
        privacy = self._reserve_privacy(spec, dataset)
        self.audit.record("job_accepted", job=spec.job_id, dataset=dataset.name, plan_sha256=plan_id(spec.plan), actor=sender)
        self.log.info("job_accepted", job=spec.job_id, dataset=dataset.name)
        answer = JobAnswer(job=spec.job_id, status="accepted", dataset=dataset.name,
                           n_samples=dataset.public().n_samples, privacy=privacy or None)
        self._send_reply(answer.reply(in_reply_to=msg_id), spec.job_id, spec.owner)
        self.publish_status()
        self._tasks.put(_Prepare(spec.job_id, _dataset_spec(dataset)))  # its first round need not wait for the fork

    def _park(self, parked: Parked) -> None:
        """Keep the job until the admin decides on its plan; the researcher is told it waits."""
        spec = parked.spec
        stored = self.plans.record_seen(spec.plan, spec.job_id, parked.sender)
        self.job_store.keep(spec.job_id, "parked", parked.dataset.name, parked.sender, parked.wire)
        pid = stored.plan_id
        self.audit.record("job_pending", job=spec.job_id, plan_sha256=pid, actor=parked.sender, dataset=parked.dataset.name)
        self.log.info("job_pending_plan_approval", job=spec.job_id, plan=pid)
        answer = JobAnswer(job=spec.job_id, status="pending", plan=pid)
        self._send_reply(answer.reply(in_reply_to=parked.msg_id,
                                      error=f"pending: plan {pid[:16]} awaits approval by the admin of node "
                                            f"{self.name} (`fbm-node plan approve {pid[:16]}`)"), spec.job_id, spec.owner)

    def review_plans(self) -> None:
        """Act on the admin's decisions: start parked jobs whose plan was approved, drop the
        parked or running jobs whose plan was rejected or revoked."""
        with self._lock:
            specs = self.site.awaiting_decision()
        for spec in specs:
            self._step(self.site.on_plan_decision, spec.job_id, self.plan_status(spec))

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
        jobs = self._job_ids()
        link = self.messenger.transport.connected if connected is None else connected
        self.state.beat(link, f"{self.messenger.transport.host}:{self.messenger.transport.port}", jobs)

    def _job_ids(self) -> list[str]:
        with self._lock:
            return self.site.job_ids()

    def _foreign(self, msg: Message, job: str) -> bool:
        """Whether `msg` is on another owner's topics about a job this node knows (runs or waits
        on): not this job's, logged and audited. Acks (on our own topic) name no owner."""
        spec, named = self._job_spec(job), topics.owner_of(msg.topic)
        if spec is None or named is None or named == spec.owner:
            return False
        reason = f"job {job!r} belongs to {spec.owner!r}, not to {named!r}"
        self.log.warning("foreign_owner_dropped", job=job, type=msg.type, sender=msg.sender, msg_id=msg.id,
                         reason=reason)
        self.audit.record("message_dropped", job=job, actor=msg.sender, reason=reason)
        return True

    def _on_withdrawal(self, msg: Message) -> None:
        job = topics.job_of(msg.topic) or ""
        if self._job_spec(job) is None or self._foreign(msg, job):
            return
        self._step(self.site.on_withdrawn, job, msg.sender)

    def _remember_end(self, job_id: str, status: str) -> None:
        """A job that ended here stays ended: its retained spec (delivered again after a restart,
        or replayed) is not taken again."""
        self.state.put(f"{ENDED}{job_id}", {"status": status})

    def _ended(self, msg: Message, spec: JobSpec) -> bool:
        ended = self.state.get(f"{ENDED}{spec.job_id}")
        if ended is not None:
            self.log.info("job_already_ended", job=spec.job_id, msg_id=msg.id, status=ended[0].get("status"),
                          owner=spec.owner)
        return ended is not None

    def _job_spec(self, job_id: str) -> JobSpec | None:
        with self._lock:
            return self.site.spec(job_id)

    def _from_bound_aggregator(self, msg: Message, job_id: str) -> bool:
        """Whether a model or an ack for `job_id` comes from the job's aggregator (see
        node/binding.py for the rule). Messages for jobs this node neither runs nor waits on
        are ignored anyway, so they bind nothing."""
        spec = self._job_spec(job_id)
        if spec is None or self._foreign(msg, job_id):
            return False
        return self.bindings.accepts(job_id, spec.aggregator.identity, msg.sender, msg.type)

    def _on_ack(self, msg: Message) -> None:
        """The aggregator holds our update in a checkpoint: stop re-sending it."""
        if not self._from_bound_aggregator(msg, msg.job or ""):
            return
        self._step(self.site.on_ack, msg.job or "", msg.body.round, msg.body.node)

    def _on_model(self, msg: Message) -> None:
        """The job's model (retained): the round to train, if any (`SiteJobs.on_model`)."""
        if not self._from_bound_aggregator(msg, topics.job_of(msg.topic) or ""):
            return
        self._step(self.site.on_model, msg, time.monotonic())

    def _queue_round(self, task: site.Train) -> None:
        """Hand a round to the training thread; a secure job's SiteRound opens first."""
        spec = self._job_spec(task.job)
        if spec is not None and spec.secure_aggregation is not None:  # it may answer the key stage
            self.secure.open(spec, task.round, task.params)
            if (early := self.secure.take_early(task.job)) is not None:
                self._on_secagg_state(early)
        self._tasks.put(task)

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
            if isinstance(task, _Prepare):
                self.trainer.prepare(task.job, task.dataset)
                continue
            with self._lock:
                job = self.site.jobs.get(task.job)
            if job is None:
                continue
            try:
                self._train_round(job, task)
            except Exception as exc:  # noqa: BLE001 - the node stays up, the researcher is told
                self.log.exception("round_failed", job=task.job, round=task.round)
                self.audit.record("round_failed", job=task.job, round_=task.round, error=str(exc))
                try:
                    self._send_reply(TrainFailed(job=task.job, round=task.round).reply(str(exc)), task.job, job.spec.owner)
                except Exception:  # noqa: BLE001
                    self.log.exception("reply_failed")

    def _train_round(self, job: Job, task: _Task) -> None:
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
            self._send_reply(TrainFailed(job=spec.job_id, round=task.round).reply(str(exc)), spec.job_id, spec.owner)
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
        pending = Pending(spec.job_id, task.round, body, uuid.uuid4().hex, time.monotonic(), spec.owner)
        with self._lock:
            self.site.on_update_sent(pending)
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

    def _secure_input(self, job: Job, task: _Task, result: dict[str, Any]) -> None:
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
        job = topics.job_of(topic) or ""
        self.messenger.send(topic, type_, body, job=job, round_=body.round, to=self._update_recipients(job))

    def _update_recipients(self, job: str) -> list[str]:
        """Who this node's updates (plain or masked) of `job` are sealed for: see JobBindings."""
        spec = self._job_spec(job)
        return self.bindings.update_recipients(job, spec.aggregator.identity if spec else None)

    def _on_secagg_state(self, msg: Message) -> None:
        """The aggregator's secure-aggregation stage for a job (retained): answer it."""
        job_id = topics.job_of(msg.topic) or ""
        if msg.topic != topics.secagg(topics.owner_of(msg.topic) or "", job_id):
            return
        if self._job_spec(job_id) is None:  # the job (or its acceptance) comes later: kept for then
            self.secure.hold_early(job_id, msg)
            return
        if not self._from_bound_aggregator(msg, job_id):
            return
        self.secure.on_state(job_id, msg.body)  # type: ignore[arg-type]

    def _send_update(self, pending: Pending) -> None:
        self.messenger.send(topics.update(pending.owner, pending.job, self.name), "update", pending.body,
                            job=pending.job, round_=pending.round, msg_id=pending.msg_id,
                            to=self._update_recipients(pending.job))

    def resend_pending(self, force: bool = False) -> None:
        """Re-send updates the aggregator has not acknowledged (same message id: no double count)."""
        with self._lock:
            due = self.site.due_resends(time.monotonic(), force)
        for action in due:
            p = action.pending
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
        if msg.type == "job_key":  # sealed for us by an aggregator: open the job (or model) held since it came
            body: JobKey = msg.body  # type: ignore[assignment]
            topic, by = body.opens(msg.sender)  # a model's key: that aggregator's models, every round's
            opened = self.messenger.reopen(topic, body.key, by=by)
            self.log.info("job_key_received", job=body.job_id, of=body.of, aggregator=msg.sender, opened=opened)
            return
        command = msg.body.command
        self.audit.record("request", actor=msg.sender, command=command)
        if command == "ping":
            self._reply("ping", to=msg.sender, in_reply_to=msg.id, data={"pong": True, "version": VERSION})
        elif command == "statistics":
            self._queue_statistics(msg)
        elif command == "plan_status":
            self._reply(command, to=msg.sender, in_reply_to=msg.id, data=self._plan_status_data(msg.body.args))
        elif command in ("list_datasets", "search"):
            tags = msg.body.args.get("tags") or []
            found = self.registry.matching(list(tags)) if tags else self.registry.list()
            self._reply(command, to=msg.sender, in_reply_to=msg.id, data={"datasets": [d.public().model_dump() for d in found]})
        else:
            self._reply(command, to=msg.sender, in_reply_to=msg.id, ok=False, error=f"unknown command {command!r}")

    def _refuse_statistics(self, msg: Message, reason: str) -> None:
        self.audit.record("statistics_refused", actor=msg.sender, reason=reason, tags=msg.body.args.get("tags"))
        self._reply("statistics", to=msg.sender, in_reply_to=msg.id, ok=False, error=reason)

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
        self._reply("statistics", to=msg.sender, in_reply_to=msg.id, data={"dataset": ds.name, **stats})

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
        job, owner = topics.job_of(topic), topics.owner_of(topic)
        if job is None or owner is None or topic != topics.job(owner, job) or exc.reason in (Reason.REPLAYED, Reason.STALE):
            return  # a replay is only logged: its researcher learnt the answer the first time
        if exc.reason == Reason.NOT_A_RECIPIENT:  # not for us (yet: its aggregator may give us the key)
            self.audit.record("job_sealed_for_others", job=job)
            return
        self.audit.record("job_refused", job=job, reason=str(exc))
        try:
            self._send_reply(JobAnswer(job=job, status="declined").reply(error=f"job refused: {exc}"), job, owner)
        except Exception:  # noqa: BLE001
            self.log.exception("reply_failed")
