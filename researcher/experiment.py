"""The researcher's Python API: describe a job, submit it, watch it, fetch its results.

    exp = Experiment("alice-bundle", plan="mlp", model_args={"hidden": 128},
                     training_args={"epochs": 1, "lr": 0.01}, tags=["fmnist"], rounds=5, quorum=3)
    job = exp.submit()
    state = exp.watch()          # rich progress; returns when the job is done or failed
    exp.results("results/")      # job spec, metrics CSV/JSON, final model, PNG plots

The researcher need not stay online: the latest global model and the job's history are retained
on the broker (each on its own topic), so `Experiment.attach(bundle, job_id)` reads the state at
any time.
"""

from __future__ import annotations

import inspect
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import topics
from common.claims import SKEW_S, newer, valid_takeover
from common.envelope import Message
from common.identity import Identity
from common.messages import (
    AggregatorRef,
    GlobalModel,
    JobClaim,
    JobSpec,
    PlanRef,
    Selection,
    Withdrawal,
)
from common.messenger import Messenger
from common.protocol import CHANNELS
from common.settings import TransportSettings
from common.training.args import ALGORITHM_OF_RULE, TrainingArgs
from common.training.loader import PlanError, check_ref, load_plan_class, source_sha256
from common.training.plan import TrainingPlan

# what only the job's aggregator says: from any other aggregator identity it is dropped
AGGREGATOR_TYPES = frozenset({"model", "job_history", "job_accepted", "round_opened", "round_closed", "job_done",
                              "job_failed"})
MAX_DROPPED = 100  # dropped messages kept in JobState.dropped (a flood is logged, not kept)


class JobError(RuntimeError):
    """The job failed, or its state could not be read; the message says why."""


@dataclass
class JobState:
    """What is known of a job: from the retained model (history included) and live events."""

    job_id: str
    status: str = "unknown"  # submitted, running, done, failed
    round: int = 0
    rounds: int = 0
    open_round: int | None = None
    nodes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    reason: str = ""
    notices: list[dict[str, Any]] = field(default_factory=list)  # node replies (declines, failures)
    aggregator: str | None = None  # the aggregator the job is bound to (pinned, or the first seen)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # messages from other aggregators, ignored
    aggregators: list[str] = field(default_factory=list)  # those that took the job over, in order

    def apply_model(self, model: GlobalModel) -> None:
        self.status = model.status
        self.round = model.round
        self.open_round = model.open_round
        self.nodes = list(model.nodes) or self.nodes
        self.params = dict(model.params)
        self.extra = dict(model.extra)
        self.reason = model.reason

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


def plan_ref(plan: str | Path | type[TrainingPlan] | PlanRef, plan_class: str | None = None) -> PlanRef:
    """A PlanRef from a zoo name, a .py file (+ class name), or a TrainingPlan subclass."""
    if isinstance(plan, PlanRef):
        ref = plan
    elif isinstance(plan, type) and issubclass(plan, TrainingPlan):
        source = inspect.getsource(sys.modules[plan.__module__])
        ref = PlanRef(source=source, sha256=source_sha256(source), class_name=plan.__name__)
    elif isinstance(plan, Path) or str(plan).endswith(".py"):
        source = Path(plan).read_text()
        if not plan_class:
            raise PlanError(f"name the TrainingPlan class defined in {plan} (plan_class)")
        ref = PlanRef(source=source, sha256=source_sha256(source), class_name=plan_class)
    else:
        ref = PlanRef(zoo=str(plan))
    check_ref(ref)
    return ref


def new_job_id(owner: str) -> str:
    return f"{owner}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _not_found(job_id: str, owner: str, me: str) -> str:
    whose = "of yours" if owner == me else f"of {owner!r} that you may read"
    return (f"no job {job_id!r} {whose} on the broker: withdrawn, never submitted, or not yours "
            f"(a job lives under its owner's name; only its owner or an admin can see or withdraw it)")


def researcher_settings(base: TransportSettings | None = None) -> TransportSettings:
    """Researcher tools keep no session: everything they need is retained on the broker."""
    base = base or TransportSettings()
    return base.model_copy(update={"clean_start": True, "session_expiry_s": 0})


class Experiment:
    """One federated training job, from the researcher's side."""

    def __init__(
        self,
        bundle: str | Path | Identity,
        *,
        tags: list[str],
        plan: str | Path | type[TrainingPlan] | PlanRef = "mlp",
        plan_class: str | None = None,
        model_args: dict[str, Any] | None = None,
        training_args: dict[str, Any] | None = None,
        rounds: int = 1,
        aggregator: str = "fedavg",
        aggregator_args: dict[str, Any] | None = None,
        aggregator_identity: str | None = None,
        quorum: int = 1,
        round_deadline_s: float = 600.0,
        stragglers: str = "wait",
        nodes: list[str] | None = None,
        selection: Selection | dict[str, Any] | None = None,
        job_id: str | None = None,
        seed: int = 0,
        description: str = "",
        secure_aggregation: dict[str, Any] | None = None,
        mqtt: TransportSettings | None = None,
    ) -> None:
        self.identity = bundle if isinstance(bundle, Identity) else Identity.load(bundle)
        self.plan = plan_ref(plan, plan_class)
        self.model_args = dict(model_args or {})
        self.training_args = {"seed": seed, **(training_args or {})}
        if aggregator in ALGORITHM_OF_RULE:  # the nodes' half of FedProx, SCAFFOLD, ADMM
            self.training_args.setdefault("algorithm", ALGORITHM_OF_RULE[aggregator])
        TrainingArgs.of(self.training_args)  # TrainingArgsError (a ValueError) before anything is sent
        self.job_id = job_id or new_job_id(self.identity.name)
        self.owner = self.identity.name  # a job lives under its owner's name (issue 18)
        self._on_broker = threading.Event()  # our job's spec is on the broker, its chunks known here
        self.spec_fields = dict(
            rounds=rounds, tags=list(tags), quorum=quorum, round_deadline_s=round_deadline_s, nodes=nodes,
            stragglers=stragglers,
            selection=selection if isinstance(selection, Selection) else Selection(**(selection or {})),
            aggregator=AggregatorRef(name=aggregator, args=aggregator_args or {}, identity=aggregator_identity),
            description=description, secure_aggregation=secure_aggregation,
        )
        self.seed = seed
        self.mqtt = researcher_settings(mqtt)
        self._messenger: Messenger | None = None
        self._aggregators: dict[str, str] = {}  # aggregator -> its last retained status (online, offline)
        self.state = JobState(self.job_id, rounds=rounds, aggregator=aggregator_identity)
        self._spec: JobSpec | None = None  # the submitted (or attached) spec, exactly as signed
        self._readers: set[str] = set()  # who the submitted job is sealed for

    # --- the job ------------------------------------------------------------------------------

    def initial_params(self) -> dict[str, torch.Tensor]:
        """The round-0 model, built locally from the plan with the experiment's seed."""
        plan_cls = load_plan_class(self.plan)
        torch.manual_seed(self.seed)
        model = plan_cls(self.model_args, self.training_args).build_model()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def spec(self) -> JobSpec:
        """The job's spec: as submitted or attached, else a new one (fresh initial parameters)."""
        if self._spec is not None:
            return self._spec
        return JobSpec(
            job_id=self.job_id, owner=self.identity.name, plan=self.plan, model_args=self.model_args,
            training_args=self.training_args, initial_params=self.initial_params(), created=time.time(),
            **self.spec_fields,
        )

    @property
    def messenger(self) -> Messenger:
        if self._messenger is None:
            client_id = uuid.uuid4().hex[:8]
            self._messenger = Messenger(self.identity, self.mqtt, client_id=client_id)
            self._events: queue.Queue[Message] = queue.Queue()
            m = self._messenger
            # claims first: a take-over's claim comes before the new aggregator's model
            m.subscribe(CHANNELS["claim"].filter(owner=self.owner, job=self.job_id), self._events.put, types={"job_claim"})
            m.subscribe(topics.history(self.owner, self.job_id), self._events.put, types={"job_history"},
                        retained_chunks=True)
            m.subscribe(topics.model(self.owner, self.job_id), self._events.put, types={"model"}, retained_chunks=True)
            m.subscribe(topics.events(self.owner, self.job_id), self._events.put)
            m.subscribe(topics.replies_to(self.identity.name), self._on_reply, types={"reply"})
            # the fleet's retained statuses: an unpinned job is sealed for every aggregator online
            m.subscribe(topics.every("agg_status"), self._on_aggregator, types={"aggregator_status"}, qos=0)
            m.connect()
        return self._messenger

    def _on_aggregator(self, msg: Message) -> None:
        self._aggregators[msg.sender] = msg.body.state  # type: ignore[attr-defined]

    def _on_job_topic(self, msg: Message) -> None:
        """Our job's spec as the broker holds it (its chunks are now known, for a withdrawal to
        clear them), or its withdrawal. The messenger checked signer == owner == topic owner.
        Read only to withdraw a job this process did not submit (a spec may be big)."""
        if msg.type == "job":
            self._on_broker.set()
        elif msg.type == "withdraw":
            self._on_broker.clear()

    def _on_reply(self, msg: Message) -> None:
        data = msg.body.data if isinstance(msg.body.data, dict) else {}
        if msg.job == self.job_id or data.get("job") == self.job_id:
            self._events.put(msg)

    def submit(self) -> str:
        """Publish the job (retained): nodes and aggregators pick it up, now or when they connect."""
        spec = self.spec()
        readers = self._job_readers(spec)
        self.messenger.send(topics.job(self.owner, self.job_id), "job", spec, job=self.job_id, retain=True,
                            to=readers, partial=True)
        self._spec, self._readers = spec, set(readers)
        self._on_broker.set()  # and the transport knows how many chunks it left retained
        self.messenger.on_key(self._reseal_for_aggregator)
        self.state.status = "submitted"
        return self.job_id

    def _job_readers(self, spec: JobSpec) -> list[str]:
        """Who the job is sealed for (common/sealed.py): its owner, its nodes (unlisted: every
        node whose key is published, as any may take it) and its aggregator (unpinned: every
        aggregator's). Waits briefly for the retained keys after connecting."""
        m = self.messenger
        pinned = [spec.aggregator.identity] if spec.aggregator.identity else []
        m.settle_keys(required=[*(spec.nodes or []), *pinned], quiet_s=0.3)
        if not pinned:  # every aggregator that says it is online may claim it: wait for their keys too
            m.settle_keys(required=[a for a, state in list(self._aggregators.items()) if state == "online"], quiet_s=0)
        aggregators = pinned or m.keyholders("aggregator")
        if m.sealing and not all(m.knows_key(a) for a in aggregators or ["?"]):
            structlog.get_logger("researcher").warning(
                "job_sealed_without_aggregator", job=spec.job_id, pinned=pinned or None,
                reason="no key of the job's aggregator yet: it is sealed for it when its key comes, while we are connected")
        nodes = spec.nodes if spec.nodes is not None else m.keyholders("node")
        return [self.identity.name, *nodes, *aggregators]

    def _reseal_for_aggregator(self, name: str) -> None:
        """An aggregator of the job whose key came after the submit (it started later): the
        job is published again, sealed for it too (same content key, one more wrap)."""
        spec = self._spec
        pinned = spec.aggregator.identity if spec is not None else None
        if (spec is None or name in self._readers or name not in self.messenger.keyholders("aggregator")
                or pinned not in (None, name) or self.state.status in ("done", "failed")):
            return
        self._readers.add(name)
        self.messenger.send(topics.job(self.owner, self.job_id), "job", spec, job=self.job_id, retain=True,
                            to=sorted(self._readers), partial=True)
        structlog.get_logger("researcher").info("job_resealed", job=self.job_id, aggregator=name)

    def withdraw(self, reason: str = "", timeout_s: float = 10.0) -> None:
        """End the job with a signed withdrawal, retained on the job's topic in place of its
        spec; every retained chunk of the spec (plan source, initial parameters) is cleared.
        The nodes drop the job, the aggregator stops it. JobError if the broker holds no such
        job under our name (only its owner, or an admin, can withdraw it)."""
        topic = topics.job(self.owner, self.job_id)
        if not self._on_broker.is_set():  # read it back: then its chunks are known and cleared with it
            self.messenger.subscribe(topic, self._on_job_topic, types={"job", "withdraw"}, retained_chunks=True)
        if not self._on_broker.wait(timeout_s):
            raise JobError(_not_found(self.job_id, self.owner, self.identity.name))
        self.messenger.send(topic, "withdraw", Withdrawal(job_id=self.job_id, reason=reason), job=self.job_id,
                            retain=True)
        self._on_broker.clear()

    def _from_bound_aggregator(self, msg: Message) -> bool:
        """Whether an aggregator's message comes from the one the job is bound to.

        The rule (the nodes' too): the aggregator the job pins (`aggregator_identity`), else
        the first aggregator heard from about the job (its `job_accepted` after a submit, or
        the retained model on attach). Any other aggregator identity could otherwise end the
        job in the researcher's eyes with a forged `done` model or `job_failed`.
        """
        if self.state.aggregator is None:
            self.state.aggregator = msg.sender
        if msg.sender == self.state.aggregator or self._taken_over(msg.sender):
            return True
        structlog.get_logger("researcher").warning("foreign_aggregator_dropped", job=self.job_id, type=msg.type,
                                                   sender=msg.sender, bound=self.state.aggregator)
        if len(self.state.dropped) < MAX_DROPPED:
            self.state.dropped.append({"type": msg.type, "sender": msg.sender, "round": msg.round,
                                       "reason": f"the job is bound to aggregator {self.state.aggregator!r}"})
        return False

    @property
    def _pinned(self) -> bool:
        return self.spec_fields["aggregator"].identity is not None

    @property
    def _claims(self) -> dict[str, JobClaim]:
        """Each aggregator's newest claim on the job (created with the messenger's queue)."""
        if "_claims_seen" not in self.__dict__:
            self._claims_seen: dict[str, JobClaim] = {}
        return self._claims_seen

    def _taken_over(self, sender: str) -> bool:
        """Whether `sender` took the job over from the bound aggregator (common/claims.py):
        then it is followed from now on. Pinned jobs are never taken over."""
        bound = self.state.aggregator or ""
        new = self._claims.get(sender)
        if self._pinned or new is None or valid_takeover(self._claims.get(bound), new, time.time(), SKEW_S) is not None:
            return False
        structlog.get_logger("researcher").info("job_aggregator_rebound", job=self.job_id, aggregator=sender,
                                                previous=bound, epoch=new.epoch)
        self.state.aggregator = sender
        self.state.aggregators.append(sender)
        return True

    def _apply(self, msg: Message) -> None:
        if msg.type == "job_claim":
            claim: JobClaim = msg.body  # type: ignore[assignment]
            if claim.job == self.job_id and newer(self._claims.get(msg.sender), claim):
                self._claims[msg.sender] = claim
            return
        if msg.type in AGGREGATOR_TYPES and not self._from_bound_aggregator(msg):
            return
        if msg.type == "model":
            self.state.apply_model(msg.body)  # type: ignore[arg-type]
        elif msg.type == "job_history":
            self.state.history = [h.model_dump() for h in msg.body.rounds]  # type: ignore[attr-defined]
        elif msg.type == "round_opened":
            self.state.nodes = list(msg.body.nodes)  # type: ignore[attr-defined]
        elif msg.type == "reply":
            notice = {"node": msg.sender, "ok": msg.body.ok, "command": msg.body.command, "error": msg.body.error,
                      "data": msg.body.data}
            self.state.notices.append(notice)
        elif msg.type == "job_failed":
            self.state.status, self.state.reason = "failed", msg.body.reason

    def poll(self, timeout_s: float = 0.0) -> JobState:
        """Apply whatever arrived, waiting up to `timeout_s` for the first message only: once
        something came, it returns when the queue is empty, so `watch` sees a job's end at once."""
        _ = self.messenger
        try:
            self._apply(self._events.get(timeout=max(0.0, timeout_s)))
            while True:
                self._apply(self._events.get_nowait())
        except queue.Empty:
            return self.state

    def _apply_for(self, seconds: float) -> JobState:
        """Apply everything that arrives in the next `seconds` (an attached job's retained state:
        its claim, model and history come on three topics)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.poll(left)
        return self.state

    def watch(self, timeout_s: float | None = None, *, progress: bool = True, console: Console | None = None) -> JobState:
        """Follow the job until it is done or failed; rich progress on the console."""
        _ = self.messenger
        console = console or Console(stderr=True)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=not progress)
        seen_notices = 0
        with bar:
            task = bar.add_task(f"job {self.job_id}", total=self.state.rounds or None, info="waiting for an aggregator")
            while not self.state.finished or self._history_behind():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.job_id} not finished after {timeout_s:.0f}s (status {self.state.status})")
                self.poll(0.5)
                for notice in self.state.notices[seen_notices:]:
                    if not notice["ok"]:
                        console.print(f"[yellow]{notice['node']}[/yellow]: {notice['error']}")
                seen_notices = len(self.state.notices)
                last = self.state.history[-1] if self.state.history else None
                info = f"round {self.state.open_round} open, {len(self.state.nodes)} node(s)" if self.state.open_round else ""
                if last:
                    loss = last["metrics"].get("train_loss")
                    info += f" | last loss {loss:.4f}" if loss is not None else ""
                bar.update(task, completed=len(self.state.history), info=info)
        return self.state

    def _history_behind(self) -> bool:
        """The model says round N is closed but its history has not arrived yet (two topics):
        wait for it a little, so a finished job's state is complete."""
        if len(self.state.history) >= self.state.round:
            return False
        first = getattr(self, "_behind_since", None) or time.monotonic()
        self._behind_since = first
        return time.monotonic() - first < 5.0

    @classmethod
    def attach(cls, bundle: str | Path | Identity, job_id: str, mqtt: TransportSettings | None = None,
               timeout_s: float = 10.0, owner: str | None = None) -> Experiment:
        """An Experiment for a job submitted earlier (maybe by another process), read from the
        broker: one of our own jobs, or (an admin) `owner`'s."""
        identity = bundle if isinstance(bundle, Identity) else Identity.load(bundle)
        owner = owner or identity.name
        got: queue.Queue[Message] = queue.Queue()
        m = Messenger(identity, researcher_settings(mqtt), client_id=uuid.uuid4().hex[:8])
        m.subscribe(topics.job(owner, job_id), got.put, types={"job", "withdraw"}, retained_chunks=True)
        m.connect()
        try:
            msg = got.get(timeout=timeout_s)
        except queue.Empty:
            raise JobError(_not_found(job_id, owner, identity.name)) from None
        finally:
            m.close()
        if msg.type == "withdraw":
            raise JobError(f"job {job_id!r} was withdrawn by {msg.sender!r}: its spec is no longer on the broker")
        spec: JobSpec = msg.body  # type: ignore[assignment]
        # its plan source would run here (model()): only the owner's word counts (the messenger
        # checked it too: owner == signer == the topic's owner)
        if not msg.sender == spec.owner == topics.owner_of(msg.topic) == owner:
            raise JobError(f"job {job_id!r} names {spec.owner!r} as its owner but is signed by {msg.sender!r}")
        exp = cls.__new__(cls)
        exp.identity, exp.plan, exp.job_id, exp.owner = identity, spec.plan, spec.job_id, owner
        exp._on_broker = threading.Event()
        exp.model_args, exp.training_args = spec.model_args, spec.training_args
        exp.spec_fields = dict(rounds=spec.rounds, tags=spec.tags, quorum=spec.quorum,
                               round_deadline_s=spec.round_deadline_s, nodes=spec.nodes, stragglers=spec.stragglers,
                               aggregator=spec.aggregator, description=spec.description, selection=spec.selection,
                               secure_aggregation=spec.secure_aggregation)
        exp.seed = TrainingArgs.of(spec.training_args).seed
        exp.mqtt = researcher_settings(mqtt)
        exp._messenger = None
        exp._readers = set()
        exp.state = JobState(spec.job_id, rounds=spec.rounds, aggregator=spec.aggregator.identity)
        exp._spec = spec
        exp._apply_for(2.0)
        return exp

    def model(self) -> torch.nn.Module:
        """The current global model as a torch module (eval mode)."""
        if not self.state.params:
            raise JobError(f"no global model for job {self.job_id} yet")
        plan_cls = load_plan_class(self.plan)
        module = plan_cls(self.model_args, self.training_args).build_model()
        module.load_state_dict(self.state.params)
        return module.eval()

    def results(self, folder: str | Path, *, tensorboard: bool = False, mlflow: str | Path | None = None) -> Path:
        """Write the experiment folder: job spec, metrics, final model, plots; with `tensorboard`
        also event files in FOLDER/tensorboard, with `mlflow` a run in that local MLflow store."""
        from researcher.results import write_results

        folder = write_results(Path(folder), self)
        if tensorboard:
            from researcher.tracking import write_tensorboard

            write_tensorboard(folder / "tensorboard", self)
        if mlflow is not None:
            from researcher.tracking import write_mlflow

            write_mlflow(Path(mlflow), self, model_file=folder / "model.pt")
        return folder

    def close(self) -> None:
        if self._messenger is not None:
            self._messenger.close()
            self._messenger = None

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
