"""The aggregator service: claims jobs and drives their rounds, one thread per job.

A round: publish the global model (retained; it names the open round, the selected nodes and
the deadline), fold updates in as they arrive, close when every selected node has answered
or dropped out (at least the quorum), or at the deadline with at least the quorum; then
checkpoint, publish `round_closed`, and open the next. A restarted aggregator resumes from
its last checkpoint.

Which jobs it runs is the fleet's decision (aggregators/claims.py, aggregators/fleet.py): an
unpinned job is claimed by exactly one aggregator, and its durable state is also shared on the
broker so that another one can take the job over if this one dies.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from pydantic import ValidationError

from aggregators.fleet import Fleet, FleetSettings
from aggregators.open_round import OpenRoundStore
from aggregators.round import (
    Ack,
    Action,
    Close,
    Drop,
    DropKind,
    Fail,
    Fold,
    Policy,
    Round,
    SaveOpen,
    Standing,
)
from aggregators.rules import AggregationRule, get_rule
from aggregators.secagg import SECAGG_SENDER, Outcome, ServerRound
from common import topics
from common.compression import CompressionError, CompressionSpec, decode_update
from common.envelope import (
    Message,
    open_envelope,
    peek_header,
    sealed_content_key,
    sealed_recipients,
)
from common.errors import BadMessage, NotReady, Reason
from common.identity import Identity
from common.messages import (
    AggregatorStatus,
    Body,
    GlobalModel,
    JobAnswer,
    JobCheckpoint,
    JobHistory,
    JobKey,
    JobSpec,
    NodeRoundReport,
    NodeStatus,
    Reply,
    RoundClosed,
    RoundOpened,
    SecAggState,
    Selection,
    TrainFailed,
    UpdateReceived,
)
from common.messenger import Messenger
from common.secagg.stages import AdvertiseKeys
from common.settings import TransportSettings
from common.training.args import TrainingArgs, TrainingArgsError

EARLY_ANSWER_JOBS = 64  # jobs whose early answers are kept (the oldest go first)
EARLY_ANSWERS_PER_JOB = 10_000
SHARE_ATTEMPTS = 3  # publishing the job's state for a take-over, before the acknowledgements it covers
PAST_OWNERS_KEPT = 4096  # owners of jobs that left this aggregator, for their finished claims (the oldest go first)


class JobFailure(RuntimeError):
    """The job cannot go on; the message is the reason published in `job_failed`."""


class HandedOver(RuntimeError):
    """Another aggregator holds the job now: stop without a word (it carries the job on)."""


@dataclass(frozen=True)
class _Event:
    """What the service hands a job's runner: an update, a node joining or leaving, withdrawal."""

    kind: Literal["update", "dropout", "joined", "withdrawn", "secagg", "handed_over"]
    node: str = ""
    message: Message | None = None
    dropout: DropKind = "offline"  # why a node left: offline, failed, declined, pending
    reason: str = ""  # the node's own words, for the log; "accepted" on a late acceptance


def check_update(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why an update cannot be folded into a model shaped like `reference` (None if it can)."""
    if params.keys() != reference.keys():
        missing, extra = reference.keys() - params.keys(), params.keys() - reference.keys()
        return f"parameter names differ (missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})"
    for key, ref in reference.items():
        value = params[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return f"{key}: got {value.dtype}{list(value.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if value.is_floating_point() and not _finite(value):
            return f"{key}: contains NaN or Inf"
    return None


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(value: torch.Tensor) -> bool:
    """Whether every element is finite: numpy's check where it can make it (a tenth of torch's
    per-call cost on a small tensor: this runs for each parameter of each update), else torch's."""
    if value.device.type == "cpu" and value.dtype in _NUMPY_FLOATS and not value.requires_grad:
        return bool(np.isfinite(value.numpy()).all())
    return bool(torch.isfinite(value).all())


def select_nodes(selection: Selection, quorum: int, round_: int, eligible: list[str]) -> list[str]:
    """The nodes of a round under the job's selection policy (recorded in round_opened).

    fraction: a seeded random draw of ceil(fraction x eligible) nodes, at least k and the
    quorum; the same seed and round give the same set. all / at_least: every eligible node
    (at_least only delays the round until k are online).
    """
    if not selection.selective:
        return list(eligible)
    want = min(len(eligible), max(selection.k, quorum, math.ceil(selection.fraction * len(eligible))))
    return sorted(random.Random(selection.seed * 1_000_003 + round_).sample(sorted(eligible), want))


def participants(spec: JobSpec, declared: dict[str, NodeStatus]) -> list[str]:
    """The nodes of a job, who may read its models: its `nodes` if it lists them, else every
    node that declared (in its last online status) a dataset with the job's tags."""
    if spec.nodes is not None:
        return sorted(spec.nodes)
    wanted = set(spec.tags)
    return sorted(n for n, st in declared.items() if any(wanted <= set(d.tags) for d in st.datasets))


def check_sample_count(n_samples: int, declared: int | None) -> str | None:
    """Why a sample count cannot be a weight (None if it can).

    FedAvg weights by it, so an inflated count lets one node outweigh all others; it may not
    exceed what the node declared for its dataset in its status. A node that declared no
    dataset with the job's tags has no count to check against: it is refused, not trusted.
    """
    if n_samples < 1:
        return f"sample count {n_samples} is not positive"
    if declared is None:
        return "the node declared no dataset with the job's tags, so its sample count cannot be a weight"
    if n_samples > declared:
        return f"sample count {n_samples} exceeds the {declared} samples the node declared"
    return None


def check_extra(extra: dict[str, torch.Tensor]) -> str | None:
    """Why an update's (or a model's) extra tensors cannot be used (None if they can): a NaN
    or Inf control variate would be summed into the server's and sent to every node."""
    for key, value in extra.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key}: contains NaN or Inf"
    return None


class Checkpoints:
    """One checkpoint per job and round, plus the job's final state, under `root/JOB/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open = OpenRoundStore()

    def _dir(self, job: str) -> Path:
        return self.root / job

    def save(self, job: str, round_: int, params: dict[str, torch.Tensor], history: list[dict[str, Any]],
             rule_state: dict[str, Any] | None = None) -> None:
        folder = self._dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"round-{round_}.pt.tmp"
        torch.save({"round": round_, "params": {k: v.clone() for k, v in params.items()}, "history": history,
                    "rule": rule_state}, tmp)
        tmp.replace(folder / f"round-{round_}.pt")

    def latest(self, job: str) -> dict[str, Any] | None:
        folder = self._dir(job)
        rounds = sorted((int(p.stem.split("-")[1].split(".")[0]) for p in folder.glob("round-*.pt")), reverse=True)
        return torch.load(folder / f"round-{rounds[0]}.pt", weights_only=True) if rounds else None

    def save_open(self, job: str, state: dict[str, Any]) -> None:
        """The open round's partial state (rule sums, who was folded), saved after each batch of
        folds: what it adds since the last save, not the whole round (aggregators/open_round.py)."""
        self._open.save(self._dir(job), state)

    def load_open(self, job: str) -> dict[str, Any] | None:
        return self._open.load(self._dir(job))

    def clear_open(self, job: str) -> None:
        self._open.clear(self._dir(job))

    def finish(self, job: str, status: str, reason: str = "") -> None:
        folder = self._dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"status": status, "reason": reason, "ts": time.time()}))

    def finished(self, job: str) -> bool:
        return (self._dir(job) / "state.json").exists()

    def save_job(self, job: str, wire: bytes | bytearray | memoryview) -> None:
        """The researcher's signed job message as received: a restart resumes the job from it
        before anything else arrives (the broker may have lost the retained copy)."""
        folder = self._dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "job.msg.tmp"
        tmp.write_bytes(bytes(wire))
        tmp.replace(folder / "job.msg")

    def load_job(self, job: str) -> bytes | None:
        path = self._dir(job) / "job.msg"
        return path.read_bytes() if path.exists() else None

    def reset(self, job: str) -> None:
        """Forget the job's rounds here (a take-over writes the fleet's newer state instead)."""
        for path in self._dir(job).glob("round-*.pt"):
            path.unlink(missing_ok=True)
        self.clear_open(job)

    def drop(self, job: str) -> None:
        """Not ours any more (handed over): never resumed from here."""
        (self._dir(job) / "job.msg").unlink(missing_ok=True)

    def save_claim(self, job: str, epoch: int) -> None:
        folder = self._dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "claim.json").write_text(json.dumps({"epoch": epoch}))

    def load_claim(self, job: str) -> int:
        path = self._dir(job) / "claim.json"
        return int(json.loads(path.read_text())["epoch"]) if path.exists() else 1

    def unfinished(self) -> list[str]:
        """Jobs claimed here (their message is kept) that have not ended."""
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if (d / "job.msg").exists() and not self.finished(d.name))


class JobRunner(threading.Thread):
    """Runs one job's rounds to the end."""

    def __init__(self, spec: JobSpec, service: AggregatorService, epoch: int = 1) -> None:
        super().__init__(name=f"job-{spec.job_id}", daemon=True)
        self.spec = spec
        self.service = service
        self.epoch = epoch  # of our claim: our checkpoints on the broker carry it
        self.shared = spec.aggregator.identity is None  # unpinned: another aggregator may take it over
        self._seq = 0
        self._shared: JobCheckpoint | None = None  # the last state shared: published again after a reconnect
        self._base: tuple[int, dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any] | None] = (0, {}, [], None)
        self.events: queue.Queue[_Event] = queue.Queue()
        self.declined: set[str] = set()
        self.pending: set[str] = set()  # nodes whose admin has not approved the plan yet
        self.current_round = 0
        self._last_model: GlobalModel | None = None
        self._last_history: JobHistory | None = None
        self._last_secagg: tuple[int, SecAggState] | None = None  # the secure stage last published
        self._carried: dict[int, tuple[dict[str, AdvertiseKeys], dict[str, Body]]] = {}  # round -> keys, early shares
        self._history_sent = -1  # rounds in the last published JobHistory
        self._closed: list[RoundClosed] = []  # the history's rounds as models, validated once each
        self._model_readers: set[str] = set()  # who the last model was sealed for (with a known key)
        self._model_keys_given: dict[str, bytes] = {}  # node -> the model content key it was given
        self._model_key_sent: bytes | None = None  # the content key of the last model published
        self._updates: dict[str, Any] = {}  # the update of each node the round told us to fold
        self.log = structlog.get_logger("aggregator").bind(job=spec.job_id, aggregator=service.name)

    # helpers
    def _send(self, type_: str, body: Any, *, retain: bool = False, round_: int | None = None, topic: str | None = None,
              to: list[str] | None = None, wrapped: list[str] | None = None) -> None:
        self.service.messenger.send(topic or topics.events(self.spec.owner, self.spec.job_id), type_, body,
                                    job=self.spec.job_id, round_=round_, retain=retain, to=to, partial=True,
                                    wrapped=wrapped)

    def _send_model(self, model: GlobalModel) -> None:
        """The model, sealed for the job's participants (common/sealed.py): its owner and its
        nodes; each republication looks them up again, so a node that joined gets it. Beyond
        `model_wraps_max` readers it carries the owner's wrap only, and each node is given the
        content key once (`_give_model_key`): N wraps in each of N deliveries made a round O(N^2)
        bytes (a 600 KB model at 10,000 nodes, 6 GB through the broker a round)."""
        m = self.service.messenger
        readers = self.service.model_readers(self.spec)
        self._model_readers = {n for n in readers if m.knows_key(n)}
        topic = topics.model(self.spec.owner, self.spec.job_id)
        wrapped, self._model_key_sent = None, None
        if len(readers) > m.transport.settings.model_wraps_max:
            wrapped = [self.spec.owner]
            self._model_key_sent = self._give_model_key(readers, [n for n in self._model_readers if n != self.spec.owner])
            if m.stream_key(topic, readers) != self._model_key_sent:  # never seal with a key the nodes were not given
                raise JobFailure("the model's content key changed while it was given to the nodes")
        self._send("model", model, retain=True, round_=model.round, topic=topic, to=readers, wrapped=wrapped)

    def _give_model_key(self, readers: list[str], names: list[str], again: bool = False) -> bytes | None:
        """Hand the model's content key (sealed for each) to those of `names` not given it yet
        (`again`: to all of them, e.g. a node back from a restart); the key, None if not sealing."""
        m = self.service.messenger
        key = m.stream_key(topics.model(self.spec.owner, self.spec.job_id), readers)
        if key is None:
            return None
        body = {"job_id": self.spec.job_id, "owner": self.spec.owner, "key": key, "of": "model"}
        for name in names:
            if not again and self._model_keys_given.get(name) == key:
                continue
            # not waiting for each PUBACK (N broker round trips); sent before the model it opens
            m.send(topics.requests(name), "job_key", JobKey.model_validate(body), job=self.spec.job_id, to=[name],
                   wait=False)
            self._model_keys_given[name] = key
        return key

    def reseal_for(self, name: str) -> None:
        """A node of the job whose key or status arrived late: give it the job's content key if
        the researcher's job was not sealed for it, and publish the last model again if that
        was not either (the model's content key is the same, now wrapped for it too). When the
        models carry no node's wrap, the node is given the model's key (again: it may have
        restarted), and the model is published again only if that key is new."""
        m = self.service.messenger
        readers = self.service.model_readers(self.spec)
        if name not in readers or not m.knows_key(name):
            return
        self._give_job_key(name)
        if self._last_model is None:
            return
        if len(readers) > m.transport.settings.model_wraps_max:
            if self._give_model_key(readers, [name], again=True) == self._model_key_sent:
                self._model_readers.add(name)  # the retained model opens with that key
                return
        elif name in self._model_readers:
            return
        self.log.info("model_resealed", node=name, round=self._last_model.round)
        self._send_model(self._last_model)

    def _give_job_key(self, name: str) -> None:
        wire = self.service.checkpoints.load_job(self.spec.job_id) or b""
        recipients = sealed_recipients(wire)
        if not recipients or name in recipients:
            return
        key = sealed_content_key(wire, self.service.messenger.keyring)
        self.service.messenger.send(topics.requests(name), "job_key", JobKey(job_id=self.spec.job_id, owner=self.spec.owner, key=key),
                                    job=self.spec.job_id, to=[name])
        self.log.info("job_key_given", node=name)

    def _publish_model(self, round_: int, params, history, *, status: str = "running", open_round: int | None = None,
                       nodes: list[str] | None = None, deadline: float | None = None, reason: str = "",
                       extra: dict[str, torch.Tensor] | None = None) -> None:
        if len(history) != self._history_sent:  # researchers' copy first: it is never behind the model
            self._last_history = JobHistory(rounds=self._history_rounds(history))
            self._send("job_history", self._last_history, retain=True, round_=round_, topic=topics.history(self.spec.owner, self.spec.job_id),
                       to=[self.spec.owner])
            self._history_sent = len(history)
        # every node reads the model every round: it carries no history, and no node list
        # unless the round is selective (N names to N nodes would make each round O(N^2))
        selective = self.spec.selection.selective
        model = GlobalModel(round=round_, params=params, aggregator=self.service.name, status=status,
                            open_round=open_round, nodes=(nodes or []) if selective else [], deadline=deadline,
                            reason=reason, extra=extra or {}, selection=self.spec.selection.mode)
        self._last_model = model
        self._send_model(model)

    def _note_closed(self, history: list[dict[str, Any]], summary: RoundClosed) -> None:
        """Add a closed round to the history; the published history keeps the round's own model
        (validating its N reports again was ~40 ms of the fleet's wait between rounds at 10,000)."""
        history.append(summary.model_dump())
        if len(self._closed) == len(history) - 1:
            self._closed.append(summary)

    def _history_rounds(self, history: list[dict[str, Any]]) -> list[RoundClosed]:
        """The history's rounds as models: only the rounds new since the last call are validated
        (a closed round does not change; all of them each round was O(rounds x nodes))."""
        if len(history) < len(self._closed):
            self._closed = []
        self._closed += [RoundClosed.model_validate(h) for h in history[len(self._closed):]]
        return list(self._closed)

    def run(self) -> None:
        spec = self.spec
        params: dict[str, torch.Tensor] = dict(spec.initial_params)
        history: list[dict[str, Any]] = []
        try:
            rule = self._rule()
            start = 0
            checkpoint = self.service.checkpoints.latest(spec.job_id)
            if checkpoint is not None:
                start, params, history = checkpoint["round"], checkpoint["params"], checkpoint["history"]
                if checkpoint.get("rule"):
                    rule.load_state_dict(checkpoint["rule"])  # cross-round state (momentum, controls)
                self.log.info("job_resumed", round=start)
            if not params:
                raise JobFailure("the job has no initial parameters")
            self._base = (start, params, history, checkpoint.get("rule") if checkpoint else None)
            self._send("job_accepted", {"aggregator": self.service.name, "nodes": self.service.eligible(spec)})
            resume = self.service.checkpoints.load_open(spec.job_id)
            for r in range(start + 1, spec.rounds + 1):
                params, summary = self._round(r, rule, params, history,
                                              resume=resume if resume and resume["round"] == r else None)
                resume = None
                self._note_closed(history, summary)
                t_save = time.perf_counter()
                self.service.checkpoints.save(spec.job_id, r, params, history, rule_state=rule.carry_over() or None)
                self._base = (r, params, history, rule.carry_over() or None)
                self._share_state(None)
                self.service.checkpoints.clear_open(spec.job_id)
                self.log.debug("checkpoint_saved", round=r, save_s=round(time.perf_counter() - t_save, 4))
                self._send("round_closed", summary, round_=r)
            self._publish_model(spec.rounds, params, history, status="done", extra=rule.model_extra())
            final = history[-1]["metrics"] if history else {}
            self._send("job_done", {"rounds": spec.rounds, "final_round": spec.rounds, "metrics": final})
            self.service.checkpoints.finish(spec.job_id, "done")
            self.service.fleet.finished(spec.job_id)
            self.log.info("job_done", rounds=spec.rounds)
        except HandedOver as exc:
            self.log.warning("job_handed_over", round=self.current_round, reason=str(exc))
        except JobFailure as exc:
            self._fail(str(exc), params, history)
        except Exception as exc:  # noqa: BLE001 - a bug fails the job loudly, not the service
            self.log.exception("job_crashed")
            self._fail(f"aggregator error: {type(exc).__name__}: {exc}", params, history)
        finally:
            self.service.forget(spec.job_id)

    def _rule(self) -> AggregationRule:
        """The job's rule, refused up front if it or the nodes' half of it does not fit."""
        spec = self.spec
        try:
            rule = get_rule(spec.aggregator.name, spec.aggregator.args)
        except ValueError as exc:
            raise JobFailure(str(exc)) from None
        try:
            algorithm = TrainingArgs.of(spec.training_args).algorithm
        except TrainingArgsError as exc:
            raise JobFailure(str(exc)) from None
        if rule.local_algorithm != algorithm:
            raise JobFailure(f"rule {rule.name!r} needs the nodes to run the {rule.local_algorithm!r} local algorithm "
                             f"(training_args.algorithm = {rule.local_algorithm!r}); the job asks for {algorithm!r}")
        try:
            self.compression = CompressionSpec.of(spec.training_args)
        except ValidationError as exc:
            raise JobFailure(f"invalid training_args.compression: {exc.errors()[0]['msg']}") from None
        if not rule.streaming:
            self.log.info("rule_holds_all_updates", rule=rule.name)
        return rule

    def _fail(self, reason: str, params, history) -> None:
        self.log.warning("job_failed", reason=reason)
        try:
            if params:
                self._publish_model(len(history), params, history, status="failed", reason=reason)
            self._send("job_failed", {"reason": reason, "round": self.current_round})
        except Exception:  # noqa: BLE001
            self.log.exception("job_failed_not_published")
        self.service.checkpoints.finish(self.spec.job_id, "failed", reason)
        self.service.fleet.finished(self.spec.job_id)

    def _wait_for_nodes(self, deadline: float) -> list[str]:
        needed = max(self.spec.quorum, self.spec.selection.k if self.spec.selection.mode == "at_least" else 1)
        while True:
            expected = [n for n in self.service.eligible(self.spec) if n not in self.declined | self.pending]
            if len(expected) >= needed or time.time() > deadline:
                return expected
            self._drain(timeout_s=0.2)

    def _drain(self, timeout_s: float) -> None:
        """Handle non-update events while waiting for nodes (updates cannot exist yet)."""
        try:
            event = self.events.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._check_ours(event)
        self._note_standing(event)

    def _check_ours(self, event: _Event) -> None:
        """Withdrawn by the researcher (the job fails), or taken over (we stop without a word)."""
        if event.kind == "withdrawn":
            raise JobFailure("the researcher withdrew the job")
        if event.kind == "handed_over":
            raise HandedOver(event.reason)

    def _share_state(self, open_state: dict[str, Any] | None) -> None:
        """Publish the job's last durable state for whoever takes it over (retained, ours;
        waits for the broker: an acknowledgement it covers goes out only after)."""
        if not self.shared:
            return
        self._seq += 1
        round_, params, history, rule_state = self._base
        state = JobCheckpoint(epoch=self.epoch, seq=self._seq, round=round_, params=params, history=history,
                              rule=rule_state, open=open_state)
        self._shared = state
        t0 = time.perf_counter()
        for attempt in range(1, SHARE_ATTEMPTS + 1):
            try:
                self._send_checkpoint(state, round_ + 1)
                break
            except Exception as exc:  # noqa: BLE001 - the local checkpoint holds; a reconnect publishes it again
                self.log.warning("state_not_shared", round=round_ + 1, attempt=attempt, error=str(exc))
        self.log.debug("checkpoint_shared", round=round_, open=open_state is not None, seq=self._seq,
                       share_s=round(time.perf_counter() - t0, 4))

    def _note_standing(self, event: _Event) -> None:
        """Declines are for the whole job; a pending plan approval lasts until the node accepts."""
        if event.kind == "dropout" and event.dropout == "declined":
            self.declined.add(event.node)
        elif event.kind == "dropout" and event.dropout == "pending":
            self.pending.add(event.node)
        elif event.kind == "joined" and event.reason == "accepted":
            self.pending.discard(event.node)
            self.declined.discard(event.node)

    def _round(self, r: int, rule: AggregationRule, params, history,
               resume: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], RoundClosed]:
        """Open round `r` (or resume it from its checkpoint), run it to its end, close it."""
        spec = self.spec
        self.current_round = r
        policy = Policy(quorum=spec.quorum, stragglers=spec.stragglers, selective=spec.selection.selective)
        if resume is None:
            opened = time.time()
            deadline = opened + spec.round_deadline_s
            eligible = self._wait_for_nodes(deadline)
            if len(eligible) < spec.quorum:
                raise JobFailure(f"round {r}: only {len(eligible)} eligible node(s) online, quorum is {spec.quorum}")
            state = Round(r, opened, deadline, policy, expected=select_nodes(spec.selection, spec.quorum, r, eligible),
                          eligible=eligible, last_save=opened, last_event=opened)
            rule.begin_round(params)
        else:  # a restarted aggregator picks the round up where the checkpoint left it
            state = Round.from_dict(resume, policy, time.time())
            self.declined |= set(resume.get("declined", []))
            self.pending |= set(resume.get("pending", []))
            rule.load_state_dict(resume["rule"])
            self.log.info("round_resumed", round=r, answered=state.answered)
        if spec.secure_aggregation is not None:  # the sites' sum is the round's one update
            return self._secure_round(state, rule, params, history, (resume or {}).get("secagg"))
        self._announce(state, rule, params, history)
        self._drive(state, rule, params)
        return self._close(state, rule, params)

    def _secure_round(self, state: Round, rule: AggregationRule, params, history,
                      resume: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], RoundClosed]:
        """Run the round's ServerRound; fold its unmasked mean as ONE update with the total count.

        Each stage is checkpointed before it is published; a restarted aggregator resumes from
        the last published stage (`resume`) and publishes it again (aggregators/secagg.py). A
        plain update for this job is never folded."""
        r = state.round
        carried, early = self._carried.get(r, ({}, {})) if resume is None else ({}, {})
        self._carried.clear()
        server = ServerRound(self.spec, r, state.expected, params, state.opened, state.deadline,
                             lambda st: self._publish_secagg(r, st), save=lambda snap: self._save_open(state, rule, snap),
                             resume=resume, carried=carried, early=early)
        if server.resumed_at is not None:
            self.log.info("secure_round_resumed", round=r, stage=server.resumed_at)
        server.start()  # before the model: a site reading it finds the first stage (keys; shares if all carried keys)
        self._announce(state, rule, params, history)
        outcome = self._drive_secure(server)
        if outcome.params is None:
            raise JobFailure(f"round {r}: {outcome.reason}")
        self._carried[r + 1] = (server.next_keys, server.early)  # that round skips its key (and shares) stage
        problem = check_update(outcome.params, params)
        if problem is not None:
            raise JobFailure(f"round {r}: the secure sum cannot be folded ({problem})")
        rule.add(outcome.params, outcome.total_count, SECAGG_SENDER, {})
        report = NodeRoundReport(node=SECAGG_SENDER, n_samples=outcome.total_count).model_dump()
        self._perform(state.on_secure_sum(list(outcome.included), list(outcome.dropped), report), state, rule, params)
        self.log.info("secure_sum_folded", round=r, included=list(outcome.included), dropped=list(outcome.dropped),
                      total_count=outcome.total_count, ignored=server.ignored[-5:])
        new_params, summary = self._close(state, rule, params)
        notes = {**summary.notes, "secure_aggregation": {"included": list(outcome.included),
                                                         "dropped": list(outcome.dropped),
                                                         "total_count": outcome.total_count}}
        return new_params, summary.model_copy(update={"notes": notes})

    def _drive_secure(self, server: ServerRound) -> Outcome:
        """Events in, stage messages to the ServerRound, until it finishes or fails (its stage
        deadlines end it: never a hang)."""
        outcome = None
        while outcome is None:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                outcome = server.tick(time.time())
                continue
            self._check_ours(event)
            self._note_standing(event)
            msg = event.message
            if event.kind == "secagg" and msg is not None and msg.round == getattr(msg.body, "round", None):
                outcome = server.on_message(event.node, msg.body, time.time())
            elif event.kind == "update":
                self.log.warning("update_dropped", round=server.round, node=event.node,
                                 reason="the job uses secure aggregation: plain updates are never folded")
            outcome = outcome or server.tick(time.time())
        return outcome

    def _publish_secagg(self, r: int, state: SecAggState) -> None:
        self._last_secagg = (r, state)
        self._send("secagg_state", state, retain=True, round_=r, topic=topics.secagg(self.spec.owner, self.spec.job_id))
        self.log.info("secagg_stage", round=r, stage=state.stage, reason=state.reason or None)

    def _announce(self, state: Round, rule: AggregationRule, params, history) -> None:
        """Publish the model that opens the round (it names the round, its nodes, its deadline)."""
        spec, r = self.spec, state.round
        t_publish = time.perf_counter()
        self._publish_model(r - 1, params, history, open_round=r, nodes=state.expected, deadline=state.deadline,
                            extra=rule.model_extra())
        publish_s = time.perf_counter() - t_publish
        self._send("round_opened", RoundOpened(round=r, nodes=state.expected, deadline=state.deadline,
                                               model_round=r - 1, selection=spec.selection.mode,
                                               eligible=state.eligible), round_=r)
        self.log.info("round_opened", round=r, nodes=state.expected, selection=spec.selection.mode,
                      model_publish_s=round(publish_s, 4))

    def _drive(self, state: Round, rule: AggregationRule, params) -> None:
        """The shell around the round's decisions: events in, actions performed, until it ends."""
        while True:
            if self._perform(state.on_tick(time.time()), state, rule, params):
                return
            try:
                event = self.events.get(timeout=state.next_wakeup(time.time()))
            except queue.Empty:
                continue
            self._check_ours(event)
            self._note_standing(event)
            self._perform(self._step(state, event), state, rule, params)

    def _step(self, state: Round, event: _Event) -> list[Action]:
        """The round's answer to one event."""
        standing = self._standing(state, event.node)
        if event.kind == "joined":
            return state.on_join(event.node, standing)
        if event.kind == "dropout":
            return state.on_dropout(event.node, event.dropout)
        msg = event.message
        assert msg is not None
        self._updates[event.node] = msg.body
        # the envelope's round and the body's must agree: either one names the round it is for
        return state.on_update(event.node, msg.round if msg.round == msg.body.round else -1, standing)

    def _standing(self, state: Round, node: str) -> Standing:
        """What the job knows of `node`; eligibility is asked only where the round needs it."""
        eligible = state.is_expected(node) or (not state.policy.selective and node in self.service.eligible(self.spec))
        return Standing(eligible=eligible, declined=node in self.declined, pending=node in self.pending)

    def _perform(self, actions: list[Action], state: Round, rule: AggregationRule, params) -> bool:
        """Carry the actions out in order; True when the round has ended (closed)."""
        r = state.round
        for action in actions:
            if isinstance(action, Fold):
                update = self._updates.pop(action.node)
                reason = self._fold(rule, params, action.node, update)
                more = (state.on_fold_failed(action.node, reason) if reason is not None else
                        state.on_folded(action.node, NodeRoundReport(node=action.node, n_samples=update.n_samples,
                                        metrics=update.metrics, timings=update.timings).model_dump(), time.time()))
                if reason is None:
                    # debug: round_closed names every folded node; a line per update was ~5% of the CPU at 10,000
                    self.log.debug("update_folded", round=r, node=action.node, n_samples=update.n_samples)
                self._perform(more, state, rule, params)
            elif isinstance(action, SaveOpen):
                self._save_open(state, rule)
            elif isinstance(action, Ack):
                self._ack(r, action.node)
            elif isinstance(action, Drop):
                self.log.info("update_dropped", round=r, node=action.node, reason=action.reason)
            elif isinstance(action, Fail):
                raise JobFailure(action.reason)
            elif isinstance(action, Close):
                return True
        return False

    def _save_open(self, state: Round, rule: AggregationRule, secagg: torch.Tensor | None = None) -> None:
        """The open round's checkpoint (and its secure-aggregation stage, if any)."""
        with contextlib.suppress(NotImplementedError):  # such a rule redoes the round after a restart
            open_state = {**state.to_dict(), "rule": rule.state_dict(), "declined": sorted(self.declined),
                          "pending": sorted(self.pending)}
            self.service.checkpoints.save_open(self.spec.job_id,
                                               {**open_state, **({"secagg": secagg} if secagg is not None else {})})
            # a take-over redoes a secure round from the last closed one (its stage state is local)
            self._share_state(open_state if secagg is None and self.spec.secure_aggregation is None else None)

    def _fold(self, rule: AggregationRule, params, node: str, update) -> str | None:
        """Decode, check and fold one update; why not, if any step refuses it (None if folded).

        Whatever goes wrong here is this update's problem, never the job's. Every check runs
        before the rule sums anything, and rules refuse before changing their sums (see
        AggregationRule.add), so a refused update leaves no partial sum behind.
        """
        try:
            incoming = update.params
            if self.compression.kind != "none":
                incoming = decode_update(update.params, params, self.compression)
            problem = (check_update(incoming, params) or check_extra(update.extra)
                       or check_sample_count(update.n_samples, self.service.declared_samples(node, self.spec)))
            if problem is None:
                rule.add(incoming, update.n_samples, node, update.extra)
            return problem
        except (CompressionError, ValueError) as exc:  # e.g. a SCAFFOLD update without its control delta
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a malformed update must not fail the job
            self.log.exception("update_fold_error", node=node)
            return f"{type(exc).__name__}: {exc}"

    def _close(self, state: Round, rule: AggregationRule, params) -> tuple[dict[str, torch.Tensor], RoundClosed]:
        """The round's new model, checked before anyone sees it, and its record."""
        r = state.round
        try:
            new_params = rule.end_round()
        except ValueError as exc:  # e.g. Krum with fewer updates than it needs
            raise JobFailure(f"round {r}: {rule.name}: {exc}") from None
        problem = check_update(new_params, params) or check_extra(rule.model_extra())
        if problem is not None:  # e.g. a server step that overflowed: the last good model stays published
            raise JobFailure(f"round {r}: {rule.name} produced an invalid global model ({problem}); not published")
        notes = {**rule.round_notes(), **({"rejected": dict(state.rejected)} if state.rejected else {})}
        norms = {n: float(new_params[n].double().norm()) for n in TrainingArgs.of(self.spec.training_args).report_norms
                 if n in new_params}
        if norms:
            notes["norms"] = norms
        reports = [NodeRoundReport.model_validate(x) for x in state.reports]
        total = sum(rep.n_samples for rep in reports)
        metric_names = set().union(*(rep.metrics for rep in reports))
        metrics = {m: sum(rep.metrics.get(m, 0.0) * rep.n_samples for rep in reports) / total for m in metric_names}
        summary = RoundClosed(round=r, reports=reports, missing=state.missing(), metrics=metrics,
                              duration_s=time.time() - state.opened, notes=notes)
        self.log.info("round_closed", round=r, nodes=sorted(state.answered), missing=summary.missing,
                      **{k: round(v, 4) for k, v in metrics.items()})
        return new_params, summary

    def _ack(self, r: int, node: str) -> None:
        try:
            # to the node's own topic: on the job's events topic every node would get every ack (N^2 a round)
            # not waiting for each PUBACK: N acks a round would cost N broker round trips
            self.service.messenger.send(topics.requests(node), "update_received", UpdateReceived(round=r, node=node),
                                        job=self.spec.job_id, round_=r, wait=False)
        except Exception as exc:  # noqa: BLE001 - the node re-sends, and we ack the duplicate
            self.log.warning("ack_not_sent", node=node, round=r, error=str(exc))

    def republish(self) -> None:
        """Publish the current history and model again (after a reconnect: a hard-killed broker
        may have lost them; nodes and aggregator keep the job spec themselves)."""
        if self._last_history is not None:
            self._send("job_history", self._last_history, retain=True, round_=self._last_model.round if self._last_model else 0,
                       topic=topics.history(self.spec.owner, self.spec.job_id), to=[self.spec.owner])
        if self._last_model is not None:
            self._send_model(self._last_model)
        if self._last_secagg is not None:  # the sites answer the open stage again (they repeat answers)
            self._send("secagg_state", self._last_secagg[1], retain=True, round_=self._last_secagg[0],
                       topic=topics.secagg(self.spec.owner, self.spec.job_id))
        if self._shared is not None:  # the state a take-over would resume from
            self._send_checkpoint(self._shared, self._shared.round + 1)

    def _send_checkpoint(self, state: JobCheckpoint, round_: int) -> None:
        """The job's durable state, retained for a take-over and sealed for the aggregators whose
        key we know (it holds the model and the open round's partial sums: issue 18)."""
        m = self.service.messenger
        m.send(topics.checkpoint(self.spec.owner, self.spec.job_id, self.service.name), "job_checkpoint", state,
               job=self.spec.job_id, round_=round_, retain=True, to=[self.service.name, *m.keyholders("aggregator")],
               partial=True)


class AggregatorService:
    """Subscribes to jobs, node statuses, replies and updates; runs a JobRunner per claimed job."""

    def __init__(self, identity: Identity, state_dir: Path, mqtt: TransportSettings | None = None,
                 fleet: FleetSettings | None = None) -> None:
        self.identity = identity
        self.name = identity.name
        self.checkpoints = Checkpoints(Path(state_dir) / "jobs")
        # the ids of processed messages survive a restart: a captured update re-published later is a replay
        self.messenger = Messenger(identity, mqtt, seen_file=Path(state_dir) / "seen.sqlite",
                                   will=(topics.agg_status(self.name), "aggregator_status", AggregatorStatus(state="offline")))
        self.fleet = Fleet(self, fleet or FleetSettings())
        self.specs: dict[str, Message] = {}  # unpinned jobs we may claim: their signed spec
        # the owners of jobs that left us (withdrawn, runner gone): their claims still go under those names
        self._past_owners: OrderedDict[str, str] = OrderedDict()
        # nodes' answers about a job that came before we ran it (declined, pending), by job
        self._early_answers: OrderedDict[str, list[tuple[str, _Event]]] = OrderedDict()
        self.log = structlog.get_logger("aggregator").bind(aggregator=self.name)
        self.nodes: dict[str, NodeStatus] = {}
        self.declared: dict[str, NodeStatus] = {}  # each node's last online status: its datasets
        self.runners: dict[str, JobRunner] = {}
        self._lock = threading.Lock()
        self.heartbeat_file = Path(state_dir) / "heartbeat.json"
        self._stopped = threading.Event()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="fbm-agg-beat", daemon=True)

    def start(self, connect_timeout_s: float | None = None) -> None:
        """Resume the jobs claimed before a restart, then subscribe: the updates our session
        queued while we were away are delivered at once and must find their job's runner."""
        resumed = self._resume_claimed()
        m = self.messenger
        m.subscribe(topics.every("status"), self._on_status, types={"node_status"})
        m.subscribe(topics.every("replies"), self._on_reply, types={"reply"})
        # updates are only queued to their runner when the handler returns: their ids are not kept
        # across a restart (a re-send after a crash is folded); the round logic dedupes them
        m.subscribe(topics.every("update"), self._on_update, types={"update"}, durable=False)
        m.subscribe(topics.every("secagg_site"), self._on_secagg, types={"secagg_keys", "secagg_shares",
                                                                        "secagg_masked", "secagg_unmask"}, durable=False)
        m.subscribe(topics.every("job"), self._on_job, types={"job", "withdraw"}, retained_chunks=True)
        m.subscribe(topics.every("claim"), self.fleet.on_claim, types={"job_claim"})
        m.subscribe(topics.every("agg_status"), self.fleet.on_peer_status, types={"aggregator_status"})
        m.on_connected(self._on_connected)
        m.on_key(self._reseal_for)
        m.connect(connect_timeout_s)
        for runner in resumed:
            runner.start()
        self.fleet.start()
        self._beat_thread.start()
        self.log.info("aggregator_started", resumed=[r.spec.job_id for r in resumed])

    def _resume_claimed(self) -> list[JobRunner]:
        """A runner (not yet started) for each job claimed here and not finished."""
        resumed = []
        for job in self.checkpoints.unfinished():
            wire = self.checkpoints.load_job(job) or b""
            try:
                owner = str(peek_header(wire).get("sender"))  # a job's signer is its owner (checked below)
                msg = open_envelope(wire, self.messenger.trust, topics.job(owner, job), keyring=self.messenger.keyring)
                if msg.type != "job" or msg.body.job_id != job or msg.body.owner != owner:  # type: ignore[attr-defined]
                    raise BadMessage(Reason.WRONG_TOPIC, "the stored message is not this job's spec")
            except BadMessage as exc:
                self.log.warning("job_not_resumed", job=job, reason=str(exc))
                continue
            runner = JobRunner(msg.body, self, epoch=self.checkpoints.load_claim(job))  # type: ignore[arg-type]
            with self._lock:
                self.runners[job] = runner
            resumed.append(runner)
            self.fleet.adopt(job, runner.epoch)  # renewed before its lease lapses; stopped if taken over meanwhile
        return resumed

    def stop(self) -> None:
        self._stopped.set()
        self.fleet.stop()
        with contextlib.suppress(Exception):  # a clean stop says so at once (the Last Will is for a crash)
            self.messenger.send(topics.agg_status(self.name), "aggregator_status", AggregatorStatus(state="offline"),
                                retain=True, timeout_s=2.0)
        self.messenger.close()
        self.beat()

    def beat(self) -> None:
        """Say this process lives, and whether it is linked (`fbm-aggregator health` reads it)."""
        with self._lock:
            jobs = sorted(self.runners)
        state = {"at": time.time(), "connected": self.messenger.transport.connected and not self._stopped.is_set(),
                 "jobs": jobs}
        tmp = self.heartbeat_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.heartbeat_file)

    def _beat_loop(self) -> None:
        while not self._stopped.wait(5.0):
            try:
                self.beat()
            except OSError as exc:
                self.log.warning("heartbeat_not_written", error=str(exc))

    # node directory
    def eligible(self, spec: JobSpec) -> list[str]:
        wanted = set(spec.tags)
        with self._lock:
            statuses = dict(self.nodes)
        return sorted(
            name for name, st in statuses.items()
            if st.state == "online"
            and (spec.nodes is None or name in spec.nodes)
            and any(wanted <= set(d.tags) for d in st.datasets)
        )

    def model_readers(self, spec: JobSpec) -> list[str]:
        """Who may read the job's models: its owner and its nodes (see `participants`)."""
        with self._lock:
            declared = dict(self.declared)
        return [spec.owner, *participants(spec, declared)]

    def _reseal_for(self, name: str) -> None:
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            try:
                runner.reseal_for(name)
            except Exception:  # noqa: BLE001 - the next republication carries it
                self.log.exception("reseal_failed", job=runner.spec.job_id, node=name)

    def declared_samples(self, node: str, spec: JobSpec) -> int | None:
        """The size of the node's largest dataset matching the job's tags, per its last online
        status (an update sent just before its node went offline is still weighed by it)."""
        with self._lock:
            status = self.declared.get(node)
        if status is None:
            return None
        sizes = [d.n_samples for d in status.datasets if set(spec.tags) <= set(d.tags)]
        return max(sizes) if sizes else None

    def forget(self, job: str) -> None:
        self._remember_owner(job)
        with self._lock:
            self.runners.pop(job, None)

    def _remember_owner(self, job: str) -> None:
        """Keep the owner of a job about to leave `specs` or `runners`: its finished claim (and
        that claim's re-publication after a reconnect) is published under the owner's topics."""
        owner = self.owner_of(job)
        if owner:
            with self._lock:
                self._past_owners[job] = owner
                self._past_owners.move_to_end(job)
                while len(self._past_owners) > PAST_OWNERS_KEPT:
                    self._past_owners.popitem(last=False)

    def _runner(self, job: str | None) -> JobRunner | None:
        with self._lock:
            return self.runners.get(job or "")

    def _runner_at(self, msg: Message) -> JobRunner | None:
        """The runner of the job `msg`'s topic is about, if the topic names that job's owner: a
        job id under another researcher's name is not this job (logged and dropped)."""
        job = topics.job_of(msg.topic) or ""
        runner = self._runner(job)
        return None if runner is None or self._foreign(msg, job) else runner

    def _foreign(self, msg: Message, job: str) -> bool:
        """Whether `msg`'s topic names another owner than the one of `job` as we know it (a
        claimed or a running job); logged when it does."""
        owner, named = self.owner_of(job), topics.owner_of(msg.topic)
        if not owner or owner == named:
            return False
        self.log.warning("foreign_owner_dropped", job=job, type=msg.type, sender=msg.sender, msg_id=msg.id,
                         reason=f"the job belongs to {owner!r}, not to {named!r}")
        return True

    def _on_connected(self, session_present: bool) -> None:
        """After any reconnect, re-publish our claims and each running job's model: a hard-killed
        broker loses retained messages newer than its last autosave."""
        self.fleet.connected()
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            try:
                runner.republish()
            except Exception:  # noqa: BLE001
                self.log.exception("republish_failed", job=runner.spec.job_id)

    # handlers
    def _on_status(self, msg: Message) -> None:
        status: NodeStatus = msg.body  # type: ignore[assignment]
        with self._lock:
            previous = self.nodes.get(msg.sender)
            self.nodes[msg.sender] = status
            if status.state == "online":
                self.declared[msg.sender] = status
            runners = list(self.runners.values())
        came_online = status.state == "online" and (previous is None or previous.state != "online")
        if came_online:
            self._reseal_for(msg.sender)  # a node of a job whose model it could not read yet
        for runner in runners:
            if status.state == "offline":
                runner.events.put(_Event("dropout", node=msg.sender, dropout="offline"))
            elif came_online and msg.sender in self.eligible(runner.spec):
                # back (or new): it joins the open round. A status refresh of a node that never
                # left is not a join, so a node whose training failed is not waited for again.
                runner.events.put(_Event("joined", node=msg.sender))

    def _on_reply(self, msg: Message) -> None:
        reply: Reply = msg.body  # type: ignore[assignment]
        try:
            answer: JobAnswer | TrainFailed | None = JobAnswer.of(reply, msg.job) or TrainFailed.of(reply, msg.job)
        except ValidationError:
            return  # not an answer this aggregator can read
        if answer is None:
            return
        if isinstance(answer, TrainFailed):
            event = _Event("dropout", node=msg.sender, dropout="failed", reason=reply.error)
        elif answer.status == "accepted":  # e.g. its plan was approved late
            event = _Event("joined", node=msg.sender, reason="accepted")
        else:  # declined, or pending: not now, maybe after approval
            event = _Event("dropout", node=msg.sender, dropout=answer.status, reason=reply.error)
        addressee = topics.addressee_of(msg.topic) or ""
        with self._lock:
            runner = self.runners.get(answer.job)
            if runner is None:  # answered before the job is ours (a fleet claim settles first): kept for then
                kept = self._early_answers.setdefault(answer.job, [])
                if len(kept) < EARLY_ANSWERS_PER_JOB:
                    kept.append((addressee, event))
                while len(self._early_answers) > EARLY_ANSWER_JOBS:
                    self._early_answers.popitem(last=False)
                return
        if addressee == runner.spec.owner:  # else a notice about a same-named job of another owner
            runner.events.put(event)

    def _on_update(self, msg: Message) -> None:
        if self._runner(topics.job_of(msg.topic)) is None:  # not ours, or not known yet: its re-send must still be processed
            self._finished_or_not_ready(msg)
            return
        runner = self._runner_at(msg)
        if runner is None:  # the job's id under another owner's name (logged)
            return
        runner.events.put(_Event("update", node=msg.sender, message=msg))

    def _on_secagg(self, msg: Message) -> None:
        """A site's secure-aggregation message (on its own topic: the sender is checked)."""
        if self._runner(topics.job_of(msg.topic)) is None:
            self._finished_or_not_ready(msg)
            return
        runner = self._runner_at(msg)
        if runner is None:  # the job's id under another owner's name (logged)
            return
        runner.events.put(_Event("secagg", node=msg.sender, message=msg))

    def _finished_or_not_ready(self, msg: Message) -> None:
        """A node's message for a job without a runner here: dropped if the job finished here
        (e.g. a replay), else NotReady (not ours, or not known yet: its re-send is processed)."""
        job = topics.job_of(msg.topic) or ""
        if self.checkpoints.finished(job):
            self.log.warning("message_dropped", topic=msg.topic, reason="job_finished", msg_id=msg.id, type=msg.type,
                             sender=msg.sender, round=msg.round, detail=f"job {job!r} finished here")
            return
        raise NotReady(f"{msg.type} from {msg.sender} for job {msg.job} that this aggregator does not run")

    def _on_job(self, msg: Message) -> None:
        """A job, or its withdrawal. The messenger checked owner == signer == the topic's owner
        (or, for a withdrawal, an admin signer)."""
        if msg.type == "withdraw":
            self._withdrawn(msg)
            return
        spec: JobSpec = msg.body  # type: ignore[assignment]
        if spec.aggregator.identity not in (None, self.name):
            return
        if self._foreign(msg, spec.job_id) or self._runner(spec.job_id) is not None:
            return  # the same id under another owner's name (logged), or ours already
        if self.checkpoints.finished(spec.job_id):
            self.log.info("job_already_finished", job=spec.job_id)
            return
        if spec.aggregator.identity is None:  # the fleet decides who runs it (aggregators/claims.py)
            with self._lock:
                self.specs[spec.job_id] = msg
            self.fleet.candidate(spec.job_id)
            return
        self._run(msg, epoch=1)
        self.fleet.adopt(spec.job_id, 1)  # pinned to us: held without a bid, never taken over

    def _run(self, msg: Message, epoch: int) -> None:
        spec: JobSpec = msg.body  # type: ignore[assignment]
        self.checkpoints.save_job(spec.job_id, msg.wire)
        self.checkpoints.save_claim(spec.job_id, epoch)
        runner = JobRunner(spec, self, epoch=epoch)
        with self._lock:
            self.runners[spec.job_id] = runner
            early = self._early_answers.pop(spec.job_id, [])
        for addressee, event in early:  # nodes that declined or wait for approval
            if addressee == spec.owner:
                runner.events.put(event)
        self.log.info("job_claimed", job=spec.job_id, rounds=spec.rounds, rule=spec.aggregator.name, epoch=epoch)
        runner.start()

    def run_claimed(self, job: str, epoch: int, previous: str | None) -> None:
        """The fleet gave us the job: run it; a take-over first fetches the job's last durable
        state from the broker and resumes from it (the model of the last closed round, the open
        round's folded updates), so no acknowledged update is lost or folded twice."""
        with self._lock:
            msg = self.specs.get(job)
        if msg is None:  # withdrawn meanwhile: nobody is to run it
            self.log.warning("claimed_job_unknown", job=job)
            self.fleet.finished(job)
            return
        if epoch > 1:
            t0 = time.time()
            state = self.fleet.last_state(job, previous)
            self.checkpoints.reset(job)
            if state is not None:
                if state.round > 0:
                    self.checkpoints.save(job, state.round, state.params, state.history, rule_state=state.rule)
                if state.open is not None:
                    self.checkpoints.save_open(job, state.open)
            self.log.info("job_taken_over", job=job, epoch=epoch, previous=previous, round=state.round if state else 0,
                          open=bool(state and state.open), fetch_s=round(time.time() - t0, 3))
        self._run(msg, epoch)

    def hand_over(self, job: str, reason: str) -> None:
        """Another aggregator holds the job: our runner stops silently, and it is not resumed here."""
        self.checkpoints.drop(job)
        runner = self._runner(job)
        if runner is not None:
            runner.events.put(_Event("handed_over", reason=reason))
        self.log.warning("job_hand_over", job=job, reason=reason)

    def owner_of(self, job: str) -> str:
        """The owner of a job this aggregator knows (its topics live under that name)."""
        with self._lock:
            msg, runner, past = self.specs.get(job), self.runners.get(job), self._past_owners.get(job, "")
        spec = msg.body if msg is not None else runner.spec if runner is not None else None
        return spec.owner if spec is not None else past  # type: ignore[union-attr]

    def _withdrawn(self, msg: Message) -> None:
        """The owner (or an admin) withdrew the job: nobody is to claim or run it any more."""
        job = topics.job_of(msg.topic) or ""
        if self._foreign(msg, job):  # the same id under another owner's name: not this job
            return
        self._remember_owner(job)
        with self._lock:
            self.specs.pop(job, None)
        self.fleet.gone(job)
        runner = self._runner(job)
        if runner is not None:
            self.log.info("job_withdrawn", job=job, by=msg.sender, msg_id=msg.id)
            runner.events.put(_Event("withdrawn"))

