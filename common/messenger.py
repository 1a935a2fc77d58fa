"""Typed, signed messaging over the transport: what every role's code talks to.

`send()` seals (validates and signs) a body and publishes it; `subscribe()` routes each
received message that passes `open_envelope`, the topic-ownership check and the duplicate
check to its handler. Anything bad is logged with its reason and dropped; the process goes on.
A message counts as seen (a later copy is a duplicate) only once every handler took it: one
that raised `NotReady` or failed stays deliverable, so its sender's re-send is processed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel

from common import topics
from common.envelope import Message, SealTo, body_span, open_envelope, peek_header, seal, seal_parts
from common.errors import BadMessage, NotReady, Reason, TransportError
from common.identity import Identity, TrustStore
from common.messages import EncKey
from common.replay import SeenIds, freshness
from common.sealed import ContentKeys, Keyring
from common.settings import TransportSettings
from common.transport import Delivery, Transport

Handler = Callable[[Message], None]
ClearHandler = Callable[[str], None]
RejectHook = Callable[[str, BadMessage], None]
KeyHook = Callable[[str], None]
HELD_BYTES = 256 * 1024 * 1024  # messages sealed for others kept for `reopen`, in all


class KeyMissing(TransportError):
    """A message must be sealed for an identity whose encryption key we have not seen yet;
    like a broker that is away, the sender keeps it and tries again."""


@dataclass(frozen=True)
class _Route:
    topic_filter: str
    handler: Handler
    types: frozenset[str] | None
    on_clear: ClearHandler | None
    durable: bool = True


def check_topic(msg: Message) -> None:
    """BadMessage unless `msg` may be on its topic: a topic that names its writer (a node's
    status, a job's owner) was written by that identity (or, for a job, by an admin); a job's
    spec names its signer as its owner; a message about a job is on that job's topics."""
    writer = topics.writer_of(msg.topic)
    if writer is not None and writer != msg.sender and not (msg.role == "admin" and msg.type == "withdraw"):
        raise BadMessage(Reason.WRONG_TOPIC, f"{msg.sender!r} sent {msg.type} on {writer!r}'s topic")
    job = topics.job_of(msg.topic)
    if job is not None and msg.job is not None and msg.job != job:
        raise BadMessage(Reason.WRONG_TOPIC, f"message for job {msg.job!r} on the topic of job {job!r}")
    body_job = getattr(msg.body, "job_id", None)
    if msg.type in ("job", "withdraw") and body_job != job:
        raise BadMessage(Reason.WRONG_TOPIC, f"{msg.type} of job {body_job!r} on the topic of job {job!r}")
    if msg.type == "job" and getattr(msg.body, "owner", None) != msg.sender:
        raise BadMessage(Reason.WRONG_OWNER,
                         f"job {body_job!r} names {getattr(msg.body, 'owner', None)!r} as its owner but is signed by {msg.sender!r}")


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
        seen_file: Path | None = None,
        torch_tensors: bool = True,
    ) -> None:
        """`seen_file`: where the ids of processed messages are kept across restarts (nodes and
        aggregators); without it they are remembered by this process only. `torch_tensors`
        false: tensors in received bodies are numpy-held (`common.codec`), and receiving never
        imports torch (the node process)."""
        self.identity = identity
        self.torch_tensors = torch_tensors
        self.trust = TrustStore(identity.ca_pem)
        self.log = structlog.get_logger("messenger").bind(identity=identity.name)
        self._routes: list[_Route] = []
        self._reject_hooks: list[RejectHook] = [on_reject] if on_reject else []
        wire_will = None
        if will is not None:
            wire_will = (will[0], seal(identity, will[1], will[2], topic=will[0])[1])
        self.transport = Transport(
            identity,
            settings,
            client_id=client_id,
            will=wire_will,
            on_delivery=self._on_delivery,
            on_reject=self._rejected,
            span_of=body_span,  # the reassembler hashes the body as it arrives (signature check)
        )
        settings = self.transport.settings
        self._seen = SeenIds(settings.dedupe_window, seen_file, keep_s=settings.max_message_age_s + settings.max_clock_skew_s)
        # end-to-end sealing (common/sealed.py): our key, everyone's published keys
        self.keyring = Keyring.of(identity.name, identity.key)
        self.sealing = self.transport.settings.seal
        self._keys: dict[str, bytes] = {}
        self._roles: dict[str, str] = {}
        self._key_hooks: list[KeyHook] = []
        self._content_keys = ContentKeys()
        self._hold_filters: list[str] = []
        self._held: OrderedDict[str, tuple[bytes | bytearray | memoryview, bool]] = OrderedDict()
        # content keys handed to us, per topic and per sender they open (None: any sender)
        self._given: OrderedDict[str, dict[str | None, bytes]] = OrderedDict()
        # our own key, published on each connection, comes back to us after every retained key
        # of the subscription made before it (the broker keeps one connection's order): its echo
        # says the retained keys are all in, without waiting for a quiet period
        self._key_echo_id: str | None = None
        self._keys_synced = threading.Event()
        self.subscribe(topics.every("keys"), self._on_key, types={"enc_key"}, qos=0)
        self.transport.on_connected(self._publish_key)

    # --- lifecycle ----------------------------------------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        self.transport.connect(timeout_s)

    def close(self) -> None:
        self.transport.close()
        self._seen.close()

    def on_connected(self, hook: Callable[[bool], None]) -> None:
        self.transport.on_connected(hook)

    def on_reject(self, hook: RejectHook) -> None:
        self._reject_hooks.append(hook)

    def set_will(self, topic: str, type_: str, body: BaseModel) -> None:
        """A fresh Last Will (new id) for the next connection."""
        self.transport.set_will(topic, seal(self.identity, type_, body, topic=topic)[1])

    # --- encryption keys ----------------------------------------------------------------------

    def on_key(self, hook: KeyHook) -> None:
        """Call `hook(name)` when an identity's encryption key becomes known (or changes)."""
        self._key_hooks.append(hook)

    def knows_key(self, name: str) -> bool:
        return name in self._keys

    def keyholders(self, role: str) -> list[str]:
        """The identities of `role` whose encryption key we know."""
        return sorted(n for n, r in list(self._roles.items()) if r == role)

    def settle_keys(self, required: Collection[str] = (), timeout_s: float = 5.0, quiet_s: float = 0.5,
                    roles: Collection[str] = ()) -> bool:
        """Wait (after connecting) until the retained keys have arrived: every `required` one,
        one at least of each of `roles`, and either the echo of the key we published on this
        connection (it comes after every retained key) or no new key for `quiet_s` (a broker
        that did not echo it); at most `timeout_s`. False if `required` or `roles` were not
        all met by then."""
        deadline, last, count = time.monotonic() + timeout_s, time.monotonic(), -1
        while True:
            if len(self._keys) != count:
                count, last = len(self._keys), time.monotonic()
            met = all(n in self._keys for n in required) and all(self.keyholders(r) for r in roles)
            settled = self._keys_synced.is_set() or time.monotonic() - last >= quiet_s
            if (met and settled) or time.monotonic() >= deadline:
                return met
            if self._keys_synced.is_set():
                time.sleep(0.01)  # a required key still to come, live
            else:
                self._keys_synced.wait(0.05)

    def _publish_key(self, session_present: bool) -> None:
        topic = topics.keys(self.identity.name)
        msg_id, wire = seal(self.identity, "enc_key", EncKey(key=self.keyring.public), topic=topic)
        self._keys_synced.clear()
        self._key_echo_id = msg_id
        self.transport.publish_stream(topic, len(wire), [wire], retain=True, wait=False)

    def _on_key(self, msg: Message) -> None:
        """A key on `keys/{name}`, signed by `name` (the topic check made sure of that)."""
        key: bytes = msg.body.key  # type: ignore[attr-defined]
        if msg.sender == self.identity.name and msg.id == self._key_echo_id:
            self._keys_synced.set()
        if self._keys.get(msg.sender) == key:
            return
        self._keys[msg.sender] = key
        self._roles[msg.sender] = msg.role
        self.log.info("enc_key_learned", peer=msg.sender)
        for hook in list(self._key_hooks):
            self._call(hook, msg.sender)

    def _seal_to(self, topic: str, to: Collection[str] | None, partial: bool,
                 wrapped: Collection[str] | None = None) -> SealTo | None:
        """Sealing for `to` (None: sent in clear). Every name needs a known key; with `partial`,
        those without one are left out (and logged), else KeyMissing. The body carries the
        wraps of `wrapped` (None: all of `to`); the others are given the key apart (`stream_key`)."""
        if to is None or not self.sealing:
            return None
        names = sorted(set(to))
        if not names and not partial:
            raise KeyMissing(f"nobody to seal {topic} for yet")
        missing = [n for n in names if n not in self._keys]
        if missing and not partial:
            raise KeyMissing(f"no encryption key known for {missing} (not online since we connected?)")
        if missing:
            self.log.info("sealed_without", topic=topic, missing=missing)
        keys = {n: self._keys[n] for n in names if n in self._keys}
        carried = tuple(n for n in keys if wrapped is None or n in wrapped)
        return SealTo(self._content_keys.for_recipients(topic, keys), carried)

    def stream_key(self, topic: str, to: Collection[str]) -> bytes | None:
        """The content key `send(topic, ..., to=to, partial=True)` seals with now (None if
        sealing is off), for the recipients whose wrap the body will not carry: handed to each
        sealed for it (`job_key`), once per key, instead of one wrap per recipient in every body."""
        seal_to = self._seal_to(topic, to, partial=True)
        return seal_to.key.key if seal_to is not None else None

    def hold_sealed(self, topic_filter: str) -> None:
        """Keep the latest message per topic under `topic_filter` that was sealed for others
        (its signature checked), at most HELD_BYTES in all, so that `reopen` can open it when
        one of its recipients hands us the content key (a node that joined a job late)."""
        self._hold_filters.append(topic_filter)

    def _hold(self, topic: str, wire: bytes | bytearray | memoryview, retained: bool) -> bool:
        """Hold a message sealed for others; True if a key given to us opened it at once."""
        if not any(topics.matches(f, topic) for f in self._hold_filters):
            return False
        self._held.pop(topic, None)
        self._held[topic] = (wire, retained)
        if topic in self._given and self._open_held(topic):  # the key came first (a model's: given once, it opens every round's)
            return True
        if len(wire) > HELD_BYTES:
            self._held.pop(topic, None)
        while sum(len(w) for w, _ in self._held.values()) > HELD_BYTES:
            self._held.popitem(last=False)
        return False

    def reopen(self, topic: str, key: bytes, by: str | None = None) -> bool:
        """Keep `key` for `topic`'s sealed messages sent by `by` (None: by anyone), open the one
        held, if any, and deliver it to the routes as if it had just arrived; False if none is
        held (the key is kept for when it comes) or it does not open with it (see `_open_held`).
        A key given `by` a sender opens only that sender's messages, so another aggregator's key
        cannot stand in for the one of the job's aggregator."""
        self._given.setdefault(topic, {})[by] = key
        self._given.move_to_end(topic)
        while len(self._given) > 1024:
            self._given.popitem(last=False)
        return self._open_held(topic)

    def _open_held(self, topic: str) -> bool:
        """Open the message held for `topic` with a key given for its sender. One that does not
        decrypt stays held: it was sealed with a newer key, still on its way (e.g. the model of
        a round after a node left the job and the content key changed)."""
        held = self._held.get(topic)
        if held is None:
            return False
        given = self._given.get(topic, {})
        key = given.get(peek_header(held[0]).get("sender")) or given.get(None)  # its signature was checked
        if key is None:
            return False
        try:
            msg = replace(open_envelope(held[0], self.trust, topic, held[1], content_key=key,
                                        torch_tensors=self.torch_tensors), wire=held[0])
            self._check_topic(msg)
            self._check_fresh(msg)
        except BadMessage as exc:
            if exc.reason == Reason.BAD_SEAL:
                self.log.info("held_for_another_key", topic=topic)
                return False
            self._held.pop(topic, None)
            self._rejected(topic, exc)
            return False
        self._held.pop(topic, None)
        self._dispatch(msg, [r for r in self._routes if topics.matches(r.topic_filter, topic)])
        return True

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
        to: Collection[str] | None = None,
        partial: bool = False,
        wrapped: Collection[str] | None = None,
    ) -> str:
        """Seal and publish; returns the message id once the broker acknowledged it (or, with
        `wait=False`, once queued: see Transport.publish_stream).

        With `to` (identity names) the body is encrypted so that only they can read it, unless
        sealing is off (`TransportSettings.seal`); see `_seal_to` for names without a known key.
        Re-sending with the same `msg_id` lets receivers drop the copy as a duplicate. `wrapped`:
        the names of `to` whose key wrap the body carries (None: all; see `stream_key`).
        """
        seal_to = self._seal_to(topic, to, partial, wrapped)
        sealed = seal_parts(self.identity, type_, body, job=job, round_=round_, msg_id=msg_id, seal_to=seal_to,
                            topic=topic)
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
        durable: bool = True,
    ) -> None:
        """Route messages on `topic_filter` (of `types`, if given) to `handler`.

        `durable=False`: the handler only queues the message (its effect is not durable when it
        returns), so its id is not kept across a restart: a re-send after a crash is processed
        (the aggregator's updates: its round logic dedupes them once checkpointed).

        QoS 1 (the default) queues messages in our session while we are away. Use QoS 0 for
        retained bulk (jobs, models): nothing is queued per offline client, and the latest
        retained copy is delivered when we subscribe again on reconnect.
        """
        route = _Route(topic_filter, handler, frozenset(types) if types else None, on_clear, durable)
        self._routes.append(route)
        self.transport.subscribe(topic_filter, retained_chunks=retained_chunks, qos=qos)

    def _on_delivery(self, delivery: Delivery) -> None:
        routes = [r for r in self._routes if topics.matches(r.topic_filter, delivery.topic)]
        if not routes:
            # e.g. a resumed session delivering before subscribe() was called: say so, loudly
            self.log.warning("no_handler_dropped", topic=delivery.topic)
            return
        if not delivery.payload:
            self._held.pop(delivery.topic, None)
            clear_handlers = [route.on_clear for route in routes if route.on_clear is not None]
            for on_clear in clear_handlers:
                self._call(on_clear, delivery.topic)
            if not clear_handlers:  # e.g. a job's topic: only a signed withdrawal ends a job
                self.log.info("unsigned_clear_ignored", topic=delivery.topic)
            return
        try:
            msg = replace(open_envelope(delivery.payload, self.trust, delivery.topic, delivery.retained,
                                        self.keyring, torch_tensors=self.torch_tensors), wire=delivery.payload)
            self._check_topic(msg)
            self._check_fresh(msg, durable=any(route.durable for route in routes))
        except BadMessage as exc:
            # signed, sealed for others: held, opened now if we were given its key, else maybe one comes
            if exc.reason != Reason.NOT_A_RECIPIENT or not self._hold(delivery.topic, delivery.payload, delivery.retained):
                self._rejected(delivery.topic, exc)
            return
        self._dispatch(msg, routes)

    def _dispatch(self, msg: Message, routes: list[_Route]) -> None:
        if self._seen.in_process(msg.id):
            self.log.info("duplicate_dropped", msg_id=msg.id, topic=msg.topic, sender=msg.sender)
            return
        routes = [route for route in routes if route.types is None or msg.type in route.types]
        taken = [self._call(route.handler, msg) for route in routes]
        if all(taken):  # only a processed message is a duplicate when it comes again
            self._seen.remember(msg.id, persist=all(route.durable for route in routes))

    def _check_fresh(self, msg: Message, durable: bool = True) -> None:
        """A live message signed too long ago, or one processed before a restart, is a replay.
        A retained one is the broker's current state: only this process's memory dedupes it
        (common/replay.py says why). `durable` false: every route of its topic is non-durable,
        so no id of such a message was ever kept across a restart and the file is not asked
        (a SQLite lookup per update was ~9% of the aggregator's samples at 10,000 nodes)."""
        settings = self.transport.settings
        # a node's offline status is its Last Will, sealed when it connected (maybe weeks ago):
        # statuses are state (the latest wins), not checked for age
        stale = freshness(msg.ts, time.time(), retained=msg.retained or msg.type == "node_status",
                          max_age_s=settings.max_message_age_s, max_skew_s=settings.max_clock_skew_s)
        if stale is not None:
            raise stale
        if not msg.retained and durable and not self._seen.in_process(msg.id) and self._seen.ever(msg.id):
            raise BadMessage(Reason.REPLAYED, f"{msg.type} {msg.id} from {msg.sender!r} was processed before a restart")

    @staticmethod
    def _check_topic(msg: Message) -> None:
        check_topic(msg)

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
