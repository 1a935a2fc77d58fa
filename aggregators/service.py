"""The aggregator service: claims jobs and drives their rounds, one thread per job.

A round: publish the global model (retained; it names the open round, the selected nodes and
the deadline), fold updates in as they arrive, close when every selected node has answered
or dropped out (at least the quorum), or at the deadline with at least the quorum; then
checkpoint, publish `round_closed`, and open the next. A restarted aggregator resumes from
its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import torch
from pydantic import ValidationError

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
from common.envelope import Message, open_envelope
from common.errors import BadMessage, NotReady, Reason
from common.identity import Identity
from common.messages import (
    GlobalModel,
    JobHistory,
    JobSpec,
    NodeRoundReport,
    NodeStatus,
    RoundClosed,
    RoundOpened,
    SecAggState,
    Selection,
    UpdateReceived,
)
from common.messenger import Messenger
from common.settings import TransportSettings


class JobFailure(RuntimeError):
    """The job cannot go on; the message is the reason published in `job_failed`."""


@dataclass(frozen=True)
class _Event:
    """What the service hands a job's runner: an update, a node joining or leaving, withdrawal."""

    kind: Literal["update", "dropout", "joined", "withdrawn", "secagg"]
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
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key}: contains NaN or Inf"
    return None


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
        """The open round's partial state (rule sums, who was folded), rewritten after each fold."""
        folder = self._dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "open.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "open.pt")

    def load_open(self, job: str) -> dict[str, Any] | None:
        path = self._dir(job) / "open.pt"
        return torch.load(path, weights_only=True) if path.exists() else None

    def clear_open(self, job: str) -> None:
        (self._dir(job) / "open.pt").unlink(missing_ok=True)

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

    def unfinished(self) -> list[str]:
        """Jobs claimed here (their message is kept) that have not ended."""
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if (d / "job.msg").exists() and not self.finished(d.name))


class JobRunner(threading.Thread):
    """Runs one job's rounds to the end."""

    def __init__(self, spec: JobSpec, service: AggregatorService) -> None:
        super().__init__(name=f"job-{spec.job_id}", daemon=True)
        self.spec = spec
        self.service = service
        self.events: queue.Queue[_Event] = queue.Queue()
        self.declined: set[str] = set()
        self.pending: set[str] = set()  # nodes whose admin has not approved the plan yet
        self.current_round = 0
        self._last_model: GlobalModel | None = None
        self._last_history: JobHistory | None = None
        self._history_sent = -1  # rounds in the last published JobHistory
        self._updates: dict[str, Any] = {}  # the update of each node the round told us to fold
        self.log = structlog.get_logger("aggregator").bind(job=spec.job_id, aggregator=service.name)

    # helpers
    def _send(self, type_: str, body: Any, *, retain: bool = False, round_: int | None = None, topic: str | None = None) -> None:
        self.service.messenger.send(topic or topics.events(self.spec.job_id), type_, body,
                                    job=self.spec.job_id, round_=round_, retain=retain)

    def _publish_model(self, round_: int, params, history, *, status: str = "running", open_round: int | None = None,
                       nodes: list[str] | None = None, deadline: float | None = None, reason: str = "",
                       extra: dict[str, torch.Tensor] | None = None) -> None:
        if len(history) != self._history_sent:  # researchers' copy first: it is never behind the model
            self._last_history = JobHistory(rounds=[RoundClosed.model_validate(h) for h in history])
            self._send("job_history", self._last_history, retain=True, round_=round_, topic=topics.history(self.spec.job_id))
            self._history_sent = len(history)
        # every node reads the model every round: it carries no history, and no node list
        # unless the round is selective (N names to N nodes would make each round O(N^2))
        selective = self.spec.selection.selective
        model = GlobalModel(round=round_, params=params, aggregator=self.service.name, status=status,
                            open_round=open_round, nodes=(nodes or []) if selective else [], deadline=deadline,
                            reason=reason, extra=extra or {}, selection=self.spec.selection.mode)
        self._last_model = model
        self._send("model", model, retain=True, round_=round_, topic=topics.model(self.spec.job_id))

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
            self._send("job_accepted", {"aggregator": self.service.name, "nodes": self.service.eligible(spec)})
            resume = self.service.checkpoints.load_open(spec.job_id)
            for r in range(start + 1, spec.rounds + 1):
                params, summary = self._round(r, rule, params, history,
                                              resume=resume if resume and resume["round"] == r else None)
                resume = None
                history.append(summary.model_dump())
                t_save = time.perf_counter()
                self.service.checkpoints.save(spec.job_id, r, params, history, rule_state=rule.carry_over() or None)
                self.service.checkpoints.clear_open(spec.job_id)
                self.log.debug("checkpoint_saved", round=r, save_s=round(time.perf_counter() - t_save, 4))
                self._send("round_closed", summary, round_=r)
            self._publish_model(spec.rounds, params, history, status="done", extra=rule.model_extra())
            final = history[-1]["metrics"] if history else {}
            self._send("job_done", {"rounds": spec.rounds, "final_round": spec.rounds, "metrics": final})
            self.service.checkpoints.finish(spec.job_id, "done")
            self.log.info("job_done", rounds=spec.rounds)
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
        algorithm = str(spec.training_args.get("algorithm", "sgd"))
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
        if event.kind == "withdrawn":
            raise JobFailure("the researcher withdrew the job")
        self._note_standing(event)

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
            return self._secure_round(state, rule, params, history)
        self._announce(state, rule, params, history)
        self._drive(state, rule, params)
        return self._close(state, rule, params)

    def _secure_round(self, state: Round, rule: AggregationRule, params,
                      history) -> tuple[dict[str, torch.Tensor], RoundClosed]:
        """Run the round's ServerRound; fold its unmasked mean as ONE update with the total count.

        Not checkpointed mid-round (the sites' keys live in memory only): a restarted aggregator
        runs the round again. A plain update for this job is never folded."""
        r = state.round
        server = ServerRound(self.spec, r, state.expected, params, state.opened, state.deadline,
                             lambda st: self._publish_secagg(r, st))
        server.start()  # before the model: a site reading the model finds the key stage open
        self._announce(state, rule, params, history)
        outcome = self._drive_secure(server)
        if outcome.params is None:
            raise JobFailure(f"round {r}: {outcome.reason}")
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
            if event.kind == "withdrawn":
                raise JobFailure("the researcher withdrew the job")
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
        self._send("secagg_state", state, retain=True, round_=r, topic=topics.secagg(self.spec.job_id))
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
            if event.kind == "withdrawn":
                raise JobFailure("the researcher withdrew the job")
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
                    self.log.info("update_folded", round=r, node=action.node, n_samples=update.n_samples)
                self._perform(more, state, rule, params)
            elif isinstance(action, SaveOpen):
                with contextlib.suppress(NotImplementedError):  # such a rule redoes the round after a restart
                    self.service.checkpoints.save_open(self.spec.job_id, {
                        **state.to_dict(), "rule": rule.state_dict(),
                        "declined": sorted(self.declined), "pending": sorted(self.pending)})
            elif isinstance(action, Ack):
                self._ack(r, action.node)
            elif isinstance(action, Drop):
                self.log.info("update_dropped", round=r, node=action.node, reason=action.reason)
            elif isinstance(action, Fail):
                raise JobFailure(action.reason)
            elif isinstance(action, Close):
                return True
        return False

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
        norms = {n: float(new_params[n].double().norm()) for n in self.spec.training_args.get("report_norms") or []
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
                       topic=topics.history(self.spec.job_id))
        if self._last_model is not None:
            self._send("model", self._last_model, retain=True, round_=self._last_model.round,
                       topic=topics.model(self.spec.job_id))


class AggregatorService:
    """Subscribes to jobs, node statuses, replies and updates; runs a JobRunner per claimed job."""

    def __init__(self, identity: Identity, state_dir: Path, mqtt: TransportSettings | None = None) -> None:
        self.identity = identity
        self.name = identity.name
        self.checkpoints = Checkpoints(Path(state_dir) / "jobs")
        self.messenger = Messenger(identity, mqtt)
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
        m.subscribe(topics.every("update"), self._on_update, types={"update"})
        m.subscribe(topics.every("secagg_site"), self._on_secagg, types={"secagg_keys", "secagg_shares",
                                                                        "secagg_masked", "secagg_unmask"})
        m.subscribe(topics.every("job"), self._on_job, types={"job"}, retained_chunks=True, on_clear=self._on_job_cleared)
        m.on_connected(self._on_connected)
        m.connect(connect_timeout_s)
        for runner in resumed:
            runner.start()
        self._beat_thread.start()
        self.log.info("aggregator_started", resumed=[r.spec.job_id for r in resumed])

    def _resume_claimed(self) -> list[JobRunner]:
        """A runner (not yet started) for each job claimed here and not finished."""
        resumed = []
        for job in self.checkpoints.unfinished():
            wire = self.checkpoints.load_job(job) or b""
            try:
                msg = open_envelope(wire, self.messenger.trust, topics.job(job))
                if msg.type != "job" or msg.body.job_id != job:  # type: ignore[attr-defined]
                    raise BadMessage(Reason.WRONG_TOPIC, "the stored message is not this job's spec")
            except BadMessage as exc:
                self.log.warning("job_not_resumed", job=job, reason=str(exc))
                continue
            runner = JobRunner(msg.body, self)  # type: ignore[arg-type]
            with self._lock:
                self.runners[job] = runner
            resumed.append(runner)
        return resumed

    def stop(self) -> None:
        self._stopped.set()
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
        with self._lock:
            self.runners.pop(job, None)

    def _runner(self, job: str | None) -> JobRunner | None:
        with self._lock:
            return self.runners.get(job or "")

    def _on_connected(self, session_present: bool) -> None:
        """After any reconnect, re-publish each running job's model: a hard-killed broker loses
        retained messages newer than its last autosave."""
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
        for runner in runners:
            if status.state == "offline":
                runner.events.put(_Event("dropout", node=msg.sender, dropout="offline"))
            elif came_online and msg.sender in self.eligible(runner.spec):
                # back (or new): it joins the open round. A status refresh of a node that never
                # left is not a join, so a node whose training failed is not waited for again.
                runner.events.put(_Event("joined", node=msg.sender))

    def _on_reply(self, msg: Message) -> None:
        reply = msg.body
        data = reply.data if isinstance(reply.data, dict) else {}
        runner = self._runner(data.get("job") or msg.job)
        if runner is None or reply.command not in ("job", "train"):
            return
        status = data.get("status")
        if reply.ok:
            if reply.command == "job" and status == "accepted":  # e.g. its plan was approved late
                runner.events.put(_Event("joined", node=msg.sender, reason="accepted"))
            return
        if reply.command == "job" and status == "pending":  # not now; maybe after approval
            runner.events.put(_Event("dropout", node=msg.sender, dropout="pending", reason=reply.error))
            return
        kind: DropKind = "declined" if reply.command == "job" else "failed"
        runner.events.put(_Event("dropout", node=msg.sender, dropout=kind, reason=reply.error))

    def _on_update(self, msg: Message) -> None:
        runner = self._runner(topics.job_of(msg.topic))
        if runner is None:  # not ours, or not known yet: its re-send must still be processed
            raise NotReady(f"update from {msg.sender} for job {msg.job} that this aggregator does not run")
        runner.events.put(_Event("update", node=msg.sender, message=msg))

    def _on_secagg(self, msg: Message) -> None:
        """A site's secure-aggregation message (on its own topic: the sender is checked)."""
        runner = self._runner(topics.job_of(msg.topic))
        if runner is None:
            raise NotReady(f"secure-aggregation message from {msg.sender} for job {msg.job} not run here")
        runner.events.put(_Event("secagg", node=msg.sender, message=msg))

    def _on_job(self, msg: Message) -> None:
        spec: JobSpec = msg.body  # type: ignore[assignment]
        if spec.job_id != topics.job_of(msg.topic):
            self.log.warning("job_topic_mismatch", job=spec.job_id, topic=msg.topic)
            return
        if spec.aggregator.identity not in (None, self.name):
            return
        with self._lock:
            if spec.job_id in self.runners:
                return
        if self.checkpoints.finished(spec.job_id):
            self.log.info("job_already_finished", job=spec.job_id)
            return
        self.checkpoints.save_job(spec.job_id, msg.wire)
        runner = JobRunner(spec, self)
        with self._lock:
            self.runners[spec.job_id] = runner
        self.log.info("job_claimed", job=spec.job_id, rounds=spec.rounds, rule=spec.aggregator.name)
        runner.start()

    def _on_job_cleared(self, topic: str) -> None:
        runner = self._runner(topics.job_of(topic))
        if runner is not None:
            runner.events.put(_Event("withdrawn"))
