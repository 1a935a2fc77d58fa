"""Typed, signed messaging over the transport: what every role's code talks to.

`send()` seals (validates and signs) a body and publishes it; `subscribe()` routes each
received message that passes `open_envelope`, the topic-ownership check and the duplicate
check to its handler. Anything bad is logged with its reason and dropped; the process goes on.
A message counts as seen (a later copy is a duplicate) only once every handler took it: one
that raised `NotReady` or failed stays deliverable, so its sender's re-send is processed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import structlog
from pydantic import BaseModel

from common import topics
from common.envelope import Message, body_span, open_envelope, seal, seal_parts
from common.errors import BadMessage, NotReady, Reason
from common.identity import Identity, TrustStore
from common.settings import TransportSettings
from common.transport import Delivery, Transport

Handler = Callable[[Message], None]
ClearHandler = Callable[[str], None]
RejectHook = Callable[[str, BadMessage], None]


@dataclass(frozen=True)
class _Route:
    topic_filter: str
    handler: Handler
    types: frozenset[str] | None
    on_clear: ClearHandler | None


class Messenger:
    """One identity's signed, validated view of the broker."""

    def __init__(
        self,
        identity: Identity,
        settings: TransportSettings | None = None,
        *,
        client_id: str | None = None,
        will: tuple[str, str, BaseModel] | None = None,
        on_reject: RejectHook | None = None,
        torch_tensors: bool = True,
    ) -> None:
        """`torch_tensors` false: tensors in received bodies are numpy-held (`common.codec`),
        and receiving never imports torch (the node process)."""
        self.identity = identity
        self.torch_tensors = torch_tensors
        self.trust = TrustStore(identity.ca_pem)
        self.log = structlog.get_logger("messenger").bind(identity=identity.name)
        self._routes: list[_Route] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._reject_hooks: list[RejectHook] = [on_reject] if on_reject else []
        wire_will = None
        if will is not None:
            wire_will = (will[0], seal(identity, will[1], will[2])[1])
        self.transport = Transport(
            identity,
            settings,
            client_id=client_id,
            will=wire_will,
            on_delivery=self._on_delivery,
            on_reject=self._rejected,
            span_of=body_span,  # the reassembler hashes the body as it arrives (signature check)
        )
        self._dedupe_window = self.transport.settings.dedupe_window

    # --- lifecycle ----------------------------------------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        self.transport.connect(timeout_s)

    def close(self) -> None:
        self.transport.close()

    def on_connected(self, hook: Callable[[bool], None]) -> None:
        self.transport.on_connected(hook)

    def on_reject(self, hook: RejectHook) -> None:
        self._reject_hooks.append(hook)

    def set_will(self, topic: str, type_: str, body: BaseModel) -> None:
        """A fresh Last Will (new id) for the next connection."""
        self.transport.set_will(topic, seal(self.identity, type_, body)[1])

    # --- sending ------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        type_: str,
        body: BaseModel | dict[str, Any],
        *,
        job: str | None = None,
        round_: int | None = None,
        retain: bool = False,
        timeout_s: float | None = None,
        msg_id: str | None = None,
        wait: bool = True,
    ) -> str:
        """Seal and publish; returns the message id once the broker acknowledged it (or, with
        `wait=False`, once queued: see Transport.publish_stream).

        Re-sending with the same `msg_id` lets receivers drop the copy as a duplicate.
        """
        sealed = seal_parts(self.identity, type_, body, job=job, round_=round_, msg_id=msg_id)
        self.transport.publish_stream(topic, sealed.size, sealed.parts, retain=retain, timeout_s=timeout_s, wait=wait)
        return sealed.msg_id

    def clear(self, topic: str) -> None:
        """Remove a retained message (and its chunks)."""
        self.transport.publish(topic, b"", retain=True)

    # --- receiving ----------------------------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        types: Collection[str] | None = None,
        retained_chunks: bool = False,
        on_clear: ClearHandler | None = None,
        qos: int = 1,
    ) -> None:
        """Route messages on `topic_filter` (of `types`, if given) to `handler`.

        QoS 1 (the default) queues messages in our session while we are away. Use QoS 0 for
        retained bulk (jobs, models): nothing is queued per offline client, and the latest
        retained copy is delivered when we subscribe again on reconnect.
        """
        route = _Route(topic_filter, handler, frozenset(types) if types else None, on_clear)
        self._routes.append(route)
        self.transport.subscribe(topic_filter, retained_chunks=retained_chunks, qos=qos)

    def _on_delivery(self, delivery: Delivery) -> None:
        routes = [r for r in self._routes if topics.matches(r.topic_filter, delivery.topic)]
        if not routes:
            # e.g. a resumed session delivering before subscribe() was called: say so, loudly
            self.log.warning("no_handler_dropped", topic=delivery.topic)
            return
        if not delivery.payload:
            for route in routes:
                if route.on_clear is not None:
                    self._call(route.on_clear, delivery.topic)
            return
        try:
            msg = replace(open_envelope(delivery.payload, self.trust, delivery.topic, delivery.retained,
                                        torch_tensors=self.torch_tensors), wire=delivery.payload)
            self._check_topic(msg)
        except BadMessage as exc:
            self._rejected(delivery.topic, exc)
            return
        if msg.id in self._seen:
            self.log.info("duplicate_dropped", msg_id=msg.id, topic=msg.topic, sender=msg.sender)
            return
        taken = [self._call(route.handler, msg) for route in routes if route.types is None or msg.type in route.types]
        if all(taken):  # only a processed message is a duplicate when it comes again
            self._remember(msg.id)

    def _remember(self, msg_id: str) -> None:
        self._seen[msg_id] = None
        if len(self._seen) > self._dedupe_window:
            self._seen.popitem(last=False)

    @staticmethod
    def _check_topic(msg: Message) -> None:
        owner = topics.writer_of(msg.topic)
        if owner is not None and owner != msg.sender:
            raise BadMessage(Reason.WRONG_TOPIC, f"{msg.sender!r} sent {msg.type} on {owner!r}'s topic")
        job = topics.job_of(msg.topic)
        if job is not None and msg.job is not None and msg.job != job:
            raise BadMessage(Reason.WRONG_TOPIC, f"message for job {msg.job!r} on the topic of job {job!r}")

    def _call(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """Run one handler; False if it did not take the message (NotReady, or it failed)."""
        try:
            fn(arg)
            return True
        except NotReady as exc:
            self.log.info("message_not_ready", msg_id=getattr(arg, "id", None), reason=str(exc))
        except Exception:
            self.log.exception("handler_failed", handler=getattr(fn, "__qualname__", repr(fn)))
        return False

    def _rejected(self, topic: str, exc: BadMessage) -> None:
        self.log.warning("message_dropped", topic=topic, reason=str(exc.reason), detail=exc.detail)
        for hook in self._reject_hooks:
            try:
                hook(topic, exc)
            except Exception:
                self.log.exception("reject_hook_failed")
