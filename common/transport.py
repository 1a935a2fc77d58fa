"""The MQTT transport: one class over paho-mqtt 2.x that moves whole payloads (bytes).

What it adds over paho (see docs/mqtt-facts.md for why each matters):
- MQTT 5 over mutual TLS, `clean_start=False` with a session expiry, QoS 1, reconnect with
  backoff, subscriptions renewed in every `on_connect`;
- clear connect errors (no cert, foreign CA, nothing listening) instead of a silent retry loop;
- `publish()` waits for the PUBACK and raises `PublishDenied` on a refusal (reason 135);
- payloads above the chunk size go as chunks + manifest and come back whole and verified;
- callbacks never run user code on the network thread: one worker thread delivers payloads.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from common import chunking, topics
from common.errors import BadMessage, ConnectError, PublishDenied, TransportError
from common.identity import Identity
from common.settings import MQTT_MAX_PACKET, TransportSettings


@dataclass(frozen=True)
class Delivery:
    """One whole payload received on `topic` (chunks already reassembled and verified)."""

    topic: str
    payload: bytes | bytearray
    retained: bool


DeliveryHandler = Callable[[Delivery], None]
RejectHandler = Callable[[str, BadMessage], None]


class _AckWaiter:
    """The PUBACK of one publish, waited for outside the network thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason_code = 0
        self.reason_name = "Success"

    def set(self, code: int, name: str) -> None:
        self.reason_code, self.reason_name = code, name
        self.event.set()


def scoped_client_id(name: str, tag: str | None = None) -> str:
    """The MQTT client id for identity `name`: `name`, or `name:tag` for extra connections.

    The broker admits only these (broker/plugin/fbm_auth.c), so no party can take over
    another's session; identity names cannot contain ':'.
    """
    if not tag or tag == name or tag.startswith(f"{name}:"):
        return tag or name
    return f"{name}:{tag}"


class Transport:
    """A connection to the federation broker as one identity."""

    def __init__(
        self,
        identity: Identity,
        settings: TransportSettings | None = None,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        on_delivery: DeliveryHandler | None = None,
        on_reject: RejectHandler | None = None,
        present_cert: bool = True,
        span_of: Callable[[memoryview], tuple[int, int] | None] | None = None,
    ) -> None:
        self.identity = identity
        self._present_cert = present_cert
        self.settings = settings or TransportSettings()
        self.host = self.settings.host or identity.broker_host
        self.port = self.settings.port or identity.broker_port
        self.client_id = scoped_client_id(identity.name, client_id)
        self.log = structlog.get_logger("transport").bind(identity=identity.name)
        self._on_delivery = on_delivery
        self._on_reject = on_reject
        self._subscriptions: dict[str, int] = {}
        self._connected_hooks: list[Callable[[bool], None]] = []
        self._lock = threading.Lock()
        self._waiters: dict[int, _AckWaiter] = {}
        self._early_acks: dict[int, tuple[int, str]] = {}
        self._retained_chunks: dict[str, int] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._reassembler = chunking.Reassembler(span_of=span_of, limits=self.settings.reassembly_limits(), log=self.log)
        self._connected = threading.Event()
        self._closing = False
        self._connect_failure: str | None = None
        self._connect_sub: tuple[int, int | None] | None = None
        self._reconnecting = False
        self._ignored_mids: set[int | None] = set()
        self._worker: threading.Thread | None = None
        self._client = self._make_client(will)

    # --- set-up -------------------------------------------------------------------------------

    def _make_client(self, will: tuple[str, bytes] | None) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        client.username_pw_set(self.identity.name)  # the broker plugin checks it is our cert's name
        client.tls_set(
            ca_certs=str(self.identity.ca_path),
            certfile=str(self.identity.cert_path) if self._present_cert else None,
            keyfile=str(self.identity.key_path) if self._present_cert else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        client.max_inflight_messages_set(self.settings.max_inflight)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def set_will(self, topic: str, payload: bytes) -> None:
        """Replace the Last Will used from the next (re)connection on."""
        self._client.will_set(topic, payload, qos=1, retain=True)

    def on_connected(self, hook: Callable[[bool], None]) -> None:
        """Run `hook(session_present)` on the worker thread after every successful connect."""
        self._connected_hooks.append(hook)

    # --- connecting ---------------------------------------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        """Connect, retrying with backoff until `timeout_s`; ConnectError says what is wrong."""
        timeout_s = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self._start_worker()
        delay = 0.2
        last_error = "no attempt made"
        while True:
            self._connect_failure = None
            try:
                self._client.connect(
                    self.host,
                    self.port,
                    keepalive=self.settings.keepalive_s,
                    clean_start=self.settings.clean_start,
                    properties=props,
                )
                self._client.loop_start()
                if self._wait_connack(deadline):
                    if self._connect_sub is not None:
                        self._await_subscribe(self._connect_sub)
                    self._reconnecting = True  # from now on paho reconnects by itself
                    self.log.info("connected", host=self.host, port=self.port)
                    return
                last_error = self._connect_failure or "no CONNACK from the broker"
                self._client.loop_stop()
                if self._connect_failure and "not authorized" in self._connect_failure.lower():
                    break
            except ssl.SSLCertVerificationError as exc:
                last_error = (
                    f"the broker's certificate is not trusted by this bundle's CA ({exc.verify_message}); "
                    "is this bundle from the same federation as the broker?"
                )
                break
            except ssl.SSLError as exc:
                last_error = f"TLS handshake failed: {exc}"
            except ConnectionRefusedError:
                last_error = f"nothing is listening on {self.host}:{self.port} (is the broker started? try `fbm-broker status`)"
            except socket.gaierror as exc:
                last_error = f"cannot resolve broker host {self.host!r}: {exc}"
                break
            except OSError as exc:
                last_error = f"cannot reach {self.host}:{self.port}: {exc}"
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        self.close()
        raise ConnectError(f"{self.identity.name} could not connect to {self.host}:{self.port}: {last_error}")

    def _wait_connack(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._connected.wait(0.05):
                return True
            if self._connect_failure is not None:
                return False
        return False

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        sock = client.socket()
        if sock is not None:  # small messages (acks, the last bytes of a chunk) must not wait for Nagle
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reason_code.is_failure:
            self._connect_failure = f"broker refused the connection: {reason_code.getName()} ({reason_code.value})"
            self.log.warning("connect_refused", reason=str(reason_code))
            return
        with self._lock:
            subs = [(f, SubscribeOptions(qos=q)) for f, q in self._subscriptions.items()]
        self._connect_sub = client.subscribe(subs) if subs else None
        if self._connect_sub is not None and self._reconnecting:
            with self._lock:  # nobody waits for the SUBACK of a background reconnect
                self._ignored_mids.add(self._connect_sub[1])
        self._connected.set()
        self._inbox.put(("connected", bool(flags.session_present)))

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not was_connected and self._connect_failure is None:
            self._connect_failure = (
                "the broker closed the connection before accepting it "
                f"({reason_code}): the client certificate is missing, expired, revoked or not "
                "issued by the federation CA"
            )
        if not self._closing:
            self.log.warning("disconnected", reason=str(reason_code))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- subscribing --------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, *, retained_chunks: bool = False, qos: int = 1) -> None:
        """Subscribe now (if connected) and after every reconnect.

        `retained_chunks` also subscribes to the chunk sub-topics of a retained payload.
        """
        filters = [topic_filter] + ([topics.chunk_filter(topic_filter)] if retained_chunks else [])
        with self._lock:
            for f in filters:
                self._subscriptions[f] = qos
        if self.connected:
            self._await_subscribe(self._client.subscribe([(f, SubscribeOptions(qos=qos)) for f in filters]))

    def _await_subscribe(self, result: tuple[int, int | None]) -> None:
        """Wait for the SUBACK, so a publish right after cannot overtake the subscription."""
        rc, mid = result
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: on_connect subscribes
        if not self._waiter_for(mid).event.wait(self.settings.publish_timeout_s):
            raise TransportError(f"no SUBACK within {self.settings.publish_timeout_s:.0f}s")

    def unsubscribe(self, topic_filter: str) -> None:
        filters = [topic_filter, topics.chunk_filter(topic_filter)]
        with self._lock:
            for f in filters:
                self._subscriptions.pop(f, None)
        if self.connected:
            self._client.unsubscribe(filters)

    # --- publishing ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                timeout_s: float | None = None) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1); chunk big payloads.

        Raises PublishDenied if the broker refuses (MQTT 5 PUBACK >= 0x80), TransportError on
        timeout or size. An empty retained payload clears the topic (and its chunks).
        """
        self.publish_stream(topic, len(payload), [payload], retain=retain, qos=qos, timeout_s=timeout_s)

    def publish_stream(self, topic: str, size: int, parts: Iterable[bytes | bytearray | memoryview], *,
                       retain: bool = False, qos: int = 1, timeout_s: float | None = None,
                       wait: bool = True) -> None:
        """`publish` for a payload produced piece by piece (a sealed envelope being hashed):
        each chunk goes to the broker as soon as it is full, so sending overlaps producing.

        `wait=False` returns once paho has the message (QoS 1 still: paho re-sends it until the
        broker acknowledges): for many small messages whose loss the protocol tolerates (acks)."""
        if size > self.settings.max_message_bytes:
            raise TransportError(f"payload of {size} bytes exceeds max_message_bytes={self.settings.max_message_bytes}")
        timeout_s = self.settings.publish_timeout_s if timeout_s is None else timeout_s
        sent: list[tuple[str, _AckWaiter | None]] = []
        chunk_count = 0
        if size <= self.settings.chunk_size:
            whole = b"".join(parts)
            sent.append((topic, self._send(topic, whole, retain, qos)))
        else:
            for frame in chunking.frames(parts, size, self.settings.chunk_size):
                if frame[:4] == chunking.MANIFEST_TAG:
                    sent.append((topic, self._send(topic, bytes(frame), retain, qos)))
                else:
                    target = topics.chunk(topic, chunk_count) if retain else topic
                    sent.append((target, self._send(target, frame, retain, qos)))
                    chunk_count += 1
        if retain:
            previous = self._retained_chunks.get(topic, 0)
            sent += [(topics.chunk(topic, i), self._send(topics.chunk(topic, i), b"", retain, qos))
                     for i in range(chunk_count, previous)]
            self._retained_chunks[topic] = chunk_count
        if not wait:
            return
        deadline = time.monotonic() + timeout_s
        for t, waiter in sent:
            if waiter is None:
                continue
            if not waiter.event.wait(max(0.0, deadline - time.monotonic())):
                raise TransportError(f"no acknowledgement for publish to {t!r} within {timeout_s:.0f}s")
            if waiter.reason_code >= 0x80:
                raise PublishDenied(t, waiter.reason_code, waiter.reason_name)

    def _send(self, topic: str, payload: bytes, retain: bool, qos: int) -> _AckWaiter | None:
        limit = min(MQTT_MAX_PACKET, self.identity.max_packet_bytes) - len(topic) - 64
        if len(payload) > limit:
            raise TransportError(
                f"a {len(payload)}-byte packet exceeds the broker's limit ({limit}); lower chunk_size"
            )
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return None
        return self._waiter_for(info.mid)

    def _waiter_for(self, mid: int) -> _AckWaiter:
        """The waiter of packet `mid`, already set if its ack beat us here (paho may call
        on_publish/on_subscribe before publish()/subscribe() return)."""
        waiter = _AckWaiter()
        with self._lock:
            early = self._early_acks.pop(mid, None)
            if early is None:
                self._waiters[mid] = waiter
        if early is not None:
            waiter.set(*early)
        return waiter

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._handle_ack(mid, 0, "granted")

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._handle_ack(mid, reason_code.value, reason_code.getName())

    def _handle_ack(self, mid: int, code: int, name: str) -> None:
        with self._lock:
            if mid in self._ignored_mids:
                self._ignored_mids.discard(mid)
                return
            waiter = self._waiters.pop(mid, None)
            if waiter is None:
                self._early_acks[mid] = (code, name)
        if waiter is not None:
            waiter.set(code, name)

    # --- receiving ----------------------------------------------------------------------------

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(("message", msg.topic, msg.payload, bool(msg.retain)))

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name=f"fbm-{self.client_id}", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                if item[0] == "connected":
                    for hook in list(self._connected_hooks):
                        hook(item[1])
                else:
                    self._receive(item[1], item[2], item[3])
            except Exception:  # a handler bug must not kill the delivery thread
                self.log.exception("handler_failed", item=item[0])

    def _receive(self, topic: str, payload: bytes, retained: bool) -> None:
        base = topics.base_of_chunk(topic)
        kind = chunking.frame_kind(payload)
        try:
            if base is not None:  # a retained chunk on its own sub-topic
                self._note_retained_chunk(base, topic)
                whole = self._reassembler.add_chunk(base, payload) if kind == "chunk" else None
                if whole is not None:
                    self._deliver(Delivery(base, whole, retained))
                return
            if kind == "chunk":
                whole = self._reassembler.add_chunk(topic, payload)
            elif kind == "manifest":
                whole = self._reassembler.add_manifest(topic, payload)
            else:
                whole = payload
            if whole is not None:
                self._deliver(Delivery(topic, whole, retained))
        except BadMessage as exc:
            self.reject(topic, exc)

    def _note_retained_chunk(self, base: str, topic: str) -> None:
        """Remember how many retained chunks `base` has on the broker, so that a retained
        publish on `base` from here (a withdrawal's tombstone) clears them all."""
        index = int(topic.rpartition("/")[2])
        if index < 100_000:
            self._retained_chunks[base] = max(self._retained_chunks.get(base, 0), index + 1)

    def _deliver(self, delivery: Delivery) -> None:
        if self._on_delivery is not None:
            self._on_delivery(delivery)

    def reject(self, topic: str, exc: BadMessage) -> None:
        """Report (or log) a dropped message; the process goes on."""
        if self._on_reject is not None:
            self._on_reject(topic, exc)
        else:
            self.log.warning("message_dropped", topic=topic, reason=str(exc.reason), detail=exc.detail)

    # --- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect normally (no Last Will) and stop the threads. The session stays."""
        self._closing = True
        with contextlib.suppress(Exception):  # already gone is fine
            self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        if self._worker is not None:
            self._inbox.put(None)
            if threading.current_thread() is not self._worker:
                self._worker.join(timeout=10)
            self._worker = None
