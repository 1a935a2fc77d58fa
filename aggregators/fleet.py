"""The I/O around the claim decisions (aggregators/claims.py): a thread that ticks the
ClaimBook, publishes our claims and status, and runs or stops jobs as it decides; the
take-over fetch of a job's last durable state from the broker.

Handlers on the network thread only record and queue; everything that waits for the broker
happens on the fleet thread (or a take-over's own thread).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from aggregators.claims import ClaimAction, ClaimBook, Publish, Start, Stop, Timing
from common import topics
from common.envelope import Message
from common.messages import AggregatorStatus, JobCheckpoint, JobClaim
from common.protocol import CHANNELS

if TYPE_CHECKING:
    from aggregators.service import AggregatorService


class FleetSettings(BaseSettings):
    """Claims and leases (environment: FBM_FLEET_*). The lease must outlast a broker
    reconnect (FBM_MQTT_RECONNECT_MAX_S); the settle window must exceed twice the clock skew
    plus the broker's delivery delay."""

    model_config = SettingsConfigDict(env_prefix="FBM_FLEET_", extra="ignore")

    lease_s: float = Field(default=30.0, gt=0, description="a holder that has not renewed its claim this long is gone")
    settle_s: float = Field(default=2.0, gt=0, description="how long bids for a job are collected before deciding")
    skew_s: float = Field(default=0.5, ge=0, description="clock difference allowed between machines")
    checkpoint_wait_s: float = Field(default=5.0, gt=0, description="a take-over waits this long for the job's state")
    tick_s: float = Field(default=0.2, gt=0)

    def timing(self) -> Timing:
        return Timing(lease_s=self.lease_s, settle_s=self.settle_s, skew_s=self.skew_s)


class Fleet:
    """This aggregator's part in the fleet: its claims, its status, take-overs."""

    def __init__(self, service: AggregatorService, settings: FleetSettings) -> None:
        self.service = service
        self.settings = settings
        self.book = ClaimBook(service.name, settings.timing())
        self.log = structlog.get_logger("aggregator").bind(aggregator=service.name)
        self._lock = threading.Lock()
        self._actions: queue.Queue[ClaimAction] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fbm-agg-fleet", daemon=True)
        self._states: dict[str, dict[str, JobCheckpoint]] = {}  # job -> aggregator -> its last checkpoint
        self._state_arrived = threading.Condition()
        self._wanted: set[str] = set()  # jobs being taken over: their checkpoints are kept
        self._last_status = 0.0

    # --- called by the service ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _do(self, fn: Callable[[], list[ClaimAction]]) -> None:
        with self._lock:
            actions = fn()
        for action in actions:
            self._actions.put(action)

    def candidate(self, job: str) -> None:
        self._do(lambda: self.book.on_job(job, time.time()))

    def gone(self, job: str) -> None:
        self._do(lambda: (self.book.on_job_gone(job), [])[1])

    def adopt(self, job: str, epoch: int) -> None:
        self._do(lambda: self.book.adopt(job, epoch, time.time()))

    def finished(self, job: str) -> None:
        self._do(lambda: self.book.on_finished(job, time.time()))

    def connected(self) -> None:
        self._do(lambda: self.book.on_connected(time.time()))
        self._last_status = 0.0  # our Last Will may have said offline meanwhile: peers must see us online before we bid

    def on_claim(self, msg: Message) -> None:
        claim: JobClaim = msg.body  # type: ignore[assignment]
        if claim.job != topics.job_of(msg.topic):
            self.log.warning("claim_topic_mismatch", job=claim.job, topic=msg.topic, msg_id=msg.id)
            return
        self.log.debug("claim_seen", job=claim.job, sender=msg.sender, epoch=claim.epoch, state=claim.state)
        self._do(lambda: self.book.on_claim(msg.sender, claim, time.time()))

    def on_peer_status(self, msg: Message) -> None:
        """Another aggregator's retained status: whether we are alone decides if bids settle."""
        status: AggregatorStatus = msg.body  # type: ignore[assignment]  # its topic names its sender: Messenger.check_topic
        self._do(lambda: (self.book.on_peer(msg.sender, status.state == "online"), [])[1])

    def on_checkpoint(self, msg: Message) -> None:
        job = topics.job_of(msg.topic) or ""
        state: JobCheckpoint = msg.body  # type: ignore[assignment]
        with self._state_arrived:
            if job not in self._wanted:
                return
            self._states.setdefault(job, {})[msg.sender] = state
            self._state_arrived.notify_all()

    def status(self) -> AggregatorStatus:
        from aggregators.rules import rule_names

        with self._lock:
            jobs = sorted(self.book.held)
        return AggregatorStatus(state="online", jobs=jobs, load=len(jobs), rules=rule_names(), at=time.time(),
                                lease_s=self.settings.lease_s)

    # --- the fleet thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._do(lambda: self.book.on_tick(time.time()))
            deadline = time.monotonic() + self.settings.tick_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    self._perform(self._actions.get(timeout=left))
                except queue.Empty:
                    break
            if time.time() - self._last_status >= self.settings.lease_s / 3:
                self._publish_status()

    def _perform(self, action: ClaimAction) -> None:
        try:
            if isinstance(action, Publish):
                c = action.claim
                self.service.messenger.send(topics.claim(self.service.owner_of(c.job), c.job, self.service.name), "job_claim", c, job=c.job,
                                            retain=True)
                if c.state != "held" or c.issued == c.since:  # renewals are not news
                    self.log.info("claim_published", job=c.job, epoch=c.epoch, state=c.state, load=c.load,
                                  previous=c.previous)
                    self._publish_status()
            elif isinstance(action, Start):
                threading.Thread(target=self.service.run_claimed, args=(action.job, action.epoch, action.previous),
                                 name=f"claim-{action.job}", daemon=True).start()
            elif isinstance(action, Stop):
                self.service.hand_over(action.job, action.reason)
        except Exception:  # noqa: BLE001 - the next tick renews or re-decides; the fleet thread goes on
            self.log.exception("claim_action_failed", action=type(action).__name__)

    def _publish_status(self) -> None:
        self._last_status = time.time()
        try:
            self.service.messenger.send(topics.agg_status(self.service.name), "aggregator_status", self.status(),
                                        retain=True)
        except Exception as exc:  # noqa: BLE001 - published again at the next period
            self.log.warning("status_not_published", error=str(exc))

    # --- take-over ------------------------------------------------------------------------------

    def last_state(self, job: str, previous: str | None) -> JobCheckpoint | None:
        """The job's last durable state on the broker: the newest (epoch, seq) of any holder's
        retained checkpoint, waiting up to checkpoint_wait_s for the previous holder's."""
        with self._state_arrived:
            self._wanted.add(job)
        topic_filter = CHANNELS["checkpoint"].filter(owner=self.service.owner_of(job), job=job)
        self.service.messenger.subscribe(topic_filter, self.on_checkpoint, types={"job_checkpoint"},
                                         retained_chunks=True, qos=0)
        deadline = time.monotonic() + self.settings.checkpoint_wait_s
        with self._state_arrived:
            while previous is not None and previous not in self._states.get(job, {}):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._state_arrived.wait(left)
            states = list(self._states.pop(job, {}).values())
            self._wanted.discard(job)
        self.service.messenger.transport.unsubscribe(topic_filter)  # our own checkpoints need not come back
        return max(states, key=lambda s: (s.epoch, s.seq)) if states else None
