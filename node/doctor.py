"""`fbm-node doctor`: check, one step at a time, everything a site needs to take part.

Each check says what it found and, when it fails, what to do about it. The checks follow the
path of a connection (config, bundle, certificate, DNS, TCP, TLS, MQTT login, topic
permissions) and then the site itself (clock, datasets, disk, the node process); a check whose
prerequisite failed is skipped, so the first failure is the one to fix.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from common import topics
from common.identity import Identity
from common.transport import scoped_client_id
from node.config import NodeSettings

Status = Literal["ok", "warn", "fail", "skip"]
MAX_SKEW_S = 120.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class _Context:
    settings: NodeSettings | None = None
    identity: Identity | None = None
    host: str = ""
    port: int = 0
    addresses: list[tuple] | None = None
    mqtt_ok: bool = False


class Doctor:
    """Runs the checks for one node folder; `clock` is injectable to test the skew check."""

    def __init__(self, node_dir: Path, *, clock: Callable[[], float] = time.time, timeout_s: float = 5.0,
                 min_free_gb: float = 1.0, expiry_warn_days: int = 30) -> None:
        self.node_dir = Path(node_dir)
        self.clock = clock
        self.timeout_s = timeout_s
        self.min_free_gb = min_free_gb
        self.expiry_warn_days = expiry_warn_days

    def run(self) -> Iterator[CheckResult]:
        ctx = _Context()
        steps = [
            ("config", self.check_config, lambda: True),
            ("bundle", self.check_bundle, lambda: ctx.settings is not None),
            ("certificate", self.check_certificate, lambda: ctx.identity is not None),
            ("dns", self.check_dns, lambda: ctx.identity is not None),
            ("tcp", self.check_tcp, lambda: bool(ctx.addresses)),
            ("tls", self.check_tls, lambda: bool(ctx.addresses)),
            ("mqtt login", self.check_mqtt, lambda: bool(ctx.addresses)),
            ("topic permissions", self.check_acl, lambda: ctx.mqtt_ok),
            ("clock", self.check_clock, lambda: ctx.identity is not None),
            ("datasets", self.check_datasets, lambda: ctx.settings is not None),
            ("disk", self.check_disk, lambda: ctx.settings is not None),
            ("node process", self.check_process, lambda: ctx.settings is not None),
        ]
        failed: list[str] = []
        for name, check, ready in steps:
            if not ready():
                yield CheckResult(name, "skip", f"skipped: fix {failed[0] if failed else 'the above'} first")
                continue
            try:
                result = check(ctx)
            except Exception as exc:  # noqa: BLE001 - a check that crashes is itself a finding
                result = CheckResult(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}",
                                     "report this with the output of `fbm-node doctor`")
            if result.status == "fail":
                failed.append(name)
            yield result

    def local_checks(self, settings: NodeSettings) -> list[CheckResult]:
        """The checks that need no network (the web console's Status page shows these)."""
        ctx = _Context(settings=settings)
        results = [self.check_bundle(ctx)]
        if ctx.identity is not None:
            results.append(self.check_certificate(ctx))
        return results + [self.check_process(ctx), self.check_datasets(ctx), self.check_disk(ctx)]

    # --- the connection path ---------------------------------------------------------------------

    def check_config(self, ctx: _Context) -> CheckResult:
        try:
            ctx.settings = NodeSettings.load(self.node_dir)
        except FileNotFoundError as exc:
            return CheckResult("config", "fail", str(exc), f"create it: fbm-node init {self.node_dir} --bundle BUNDLE")
        except Exception as exc:  # noqa: BLE001 - pydantic / toml errors, shown as they are
            return CheckResult("config", "fail", f"{self.node_dir / 'node.toml'} is invalid: {exc}".splitlines()[0],
                               "fix the named setting in node.toml (or the FBM_NODE_* variable that overrides it)")
        return CheckResult("config", "ok", f"{self.node_dir / 'node.toml'} is valid")

    def check_bundle(self, ctx: _Context) -> CheckResult:
        assert ctx.settings is not None
        try:
            identity = Identity.load(ctx.settings.bundle)
        except (ValueError, OSError) as exc:
            return CheckResult("bundle", "fail", str(exc),
                               "copy the bundle from the federation admin again, then `fbm-node init --force`")
        if identity.role != "node":
            return CheckResult("bundle", "fail", f"the bundle is a {identity.role} identity, not a node",
                               "ask the admin for a node bundle: fbm-broker enroll --role node")
        key_mode = identity.key_path.stat().st_mode & 0o077
        ctx.identity = identity
        ctx.host = ctx.settings.mqtt.host or identity.broker_host
        ctx.port = ctx.settings.mqtt.port or identity.broker_port
        if key_mode:
            return CheckResult("bundle", "warn", f"{identity.key_path} is readable by others (mode {oct(key_mode)})",
                               f"chmod 600 {identity.key_path}")
        return CheckResult("bundle", "ok", f"identity {identity.name} ({identity.role}), key matches certificate")

    def check_certificate(self, ctx: _Context) -> CheckResult:
        assert ctx.identity is not None
        cert = x509.load_pem_x509_certificate(ctx.identity.cert_pem)
        ca = x509.load_pem_x509_certificate(ctx.identity.ca_pem)
        try:
            ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes)  # type: ignore[call-arg]
        except InvalidSignature:
            return CheckResult("certificate", "fail", "the certificate was not issued by the bundle's CA",
                               "the bundle mixes two federations: ask the admin for a fresh bundle")
        now = self.clock()
        if now < cert.not_valid_before_utc.timestamp():
            return CheckResult("certificate", "fail", f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                               "(or this machine's clock is behind)", "check the clock (see the clock check)")
        days = (cert.not_valid_after_utc.timestamp() - now) / 86400
        if days < 0:
            return CheckResult("certificate", "fail", f"expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                               f"ask the admin: fbm-broker renew WORKSPACE --id {ctx.identity.name}, then replace identity.crt")
        if days < self.expiry_warn_days:
            return CheckResult("certificate", "warn", f"expires in {days:.0f} days ({cert.not_valid_after_utc:%Y-%m-%d})",
                               f"ask the admin for a renewal: fbm-broker renew WORKSPACE --id {ctx.identity.name}")
        return CheckResult("certificate", "ok", f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({days:.0f} days)")

    def check_dns(self, ctx: _Context) -> CheckResult:
        try:
            ctx.addresses = socket.getaddrinfo(ctx.host, ctx.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return CheckResult("dns", "fail", f"cannot resolve {ctx.host!r}: {exc.strerror}",
                               "check the broker host name in the bundle (or FBM_NODE_MQTT__HOST) and this machine's DNS")
        shown = sorted({a[4][0] for a in ctx.addresses})
        return CheckResult("dns", "ok", f"{ctx.host} -> {', '.join(shown)}")

    def check_tcp(self, ctx: _Context) -> CheckResult:
        started = time.monotonic()
        try:
            with socket.create_connection((ctx.host, ctx.port), timeout=self.timeout_s):
                pass
        except ConnectionRefusedError:
            return CheckResult("tcp", "fail", f"{ctx.host}:{ctx.port} refused the connection",
                               "the broker is not running or listens elsewhere: `fbm-broker status` on the broker host")
        except OSError as exc:
            return CheckResult("tcp", "fail", f"cannot reach {ctx.host}:{ctx.port}: {exc}",
                               f"open outbound TCP {ctx.port} to {ctx.host} in the site firewall (the only port a node needs)")
        return CheckResult("tcp", "ok", f"{ctx.host}:{ctx.port} reachable in {1000 * (time.monotonic() - started):.0f} ms")

    def check_tls(self, ctx: _Context) -> CheckResult:
        assert ctx.identity is not None
        context = ssl.create_default_context(cafile=str(ctx.identity.ca_path))
        context.load_cert_chain(str(ctx.identity.cert_path), str(ctx.identity.key_path))
        try:
            with socket.create_connection((ctx.host, ctx.port), timeout=self.timeout_s) as raw, \
                    context.wrap_socket(raw, server_hostname=ctx.host) as tls:
                version = tls.version()
                server = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        except ssl.SSLCertVerificationError as exc:
            return CheckResult("tls", "fail", f"the broker's certificate is not trusted: {exc.verify_message}",
                               "the broker must be started from the same federation workspace as this bundle; "
                               f"if the name is the problem, the admin re-runs `fbm-broker init --host {ctx.host}`")
        except (ssl.SSLError, OSError) as exc:
            return CheckResult("tls", "fail", f"TLS handshake with {ctx.host}:{ctx.port} failed: {exc}",
                               "is this port the broker's TLS listener? (a proxy doing TLS inspection breaks mutual TLS)")
        return CheckResult("tls", "ok", f"{version}, broker certificate trusted, valid until {server.not_valid_after_utc:%Y-%m-%d}")

    def _client(self, ctx: _Context, tag: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        assert ctx.identity is not None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=scoped_client_id(ctx.identity.name, tag),
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(ctx.identity.name)
        client.tls_set(ca_certs=str(ctx.identity.ca_path), certfile=str(ctx.identity.cert_path),
                       keyfile=str(ctx.identity.key_path), cert_reqs=ssl.CERT_REQUIRED)
        return client

    def _session(self, ctx: _Context, tag: str = "doctor") -> _Probe:
        return _Probe(self._client(ctx, tag), ctx.host, ctx.port, self.timeout_s)

    def check_mqtt(self, ctx: _Context) -> CheckResult:
        with self._session(ctx) as probe:
            if probe.connack is None:
                return CheckResult("mqtt login", "fail", f"no answer from the broker: {probe.error or 'timeout'}",
                                   "the broker refused our certificate during the handshake: is it revoked? "
                                   "(`fbm-broker identities` on the broker host)")
            if probe.connack != 0:
                return CheckResult("mqtt login", "fail", f"the broker refused the login: {probe.connack_name} ({probe.connack})",
                                   "this identity is revoked or unknown to the broker: ask the federation admin "
                                   "(`fbm-broker identities`, then enroll again)")
        ctx.mqtt_ok = True
        return CheckResult("mqtt login", "ok", "logged in as " + ctx.identity.name if ctx.identity else "logged in")

    def check_acl(self, ctx: _Context) -> CheckResult:
        """Mosquitto grants every SUBACK and silently withholds what the ACL forbids, so the
        check is by delivery: a probe this identity sends on its own replies topic (which a node
        may write but not read) must not come back, nor any retained status of any node; and a
        write to a model topic must be refused."""
        from common.envelope import seal
        from common.messages import Reply

        assert ctx.identity is not None
        me = ctx.identity.name
        own = topics.requests(me)
        leaks: list[str] = []
        with self._session(ctx, "doctor") as reader, self._session(ctx, "doctor-w") as writer:
            granted = reader.subscribe(own)
            probe_topic = topics.replies(me, "doctor-probe")
            reader.collect(probe_topic, lambda p: leaks.append(probe_topic), wait_s=0)
            reader.collect("fbm/v1/nodes/+/status", lambda p: leaks.append("fbm/v1/nodes/+/status"), wait_s=0)
            _, probe = seal(ctx.identity, "reply", Reply(command="doctor", in_reply_to="doctor-probe"), topic=probe_topic)
            sent = writer.publish(probe_topic, probe)
            forbidden = writer.publish(topics.model("doctor-probe", "doctor-probe"), b"")
            time.sleep(1.0)
        if granted is None or granted >= 0x80:
            return CheckResult("topic permissions", "fail", f"may not subscribe to its own requests ({own}): code {granted}",
                               "the broker's ACL lacks this node: the admin runs `fbm-broker reload WORKSPACE`")
        if sent is None or sent >= 0x80:
            return CheckResult("topic permissions", "fail", f"may not write its own replies topic (code {sent})",
                               "the broker's ACL lacks this node: the admin runs `fbm-broker reload WORKSPACE`")
        if leaks or (forbidden is not None and forbidden < 0x80):
            what = sorted(set(leaks)) + ([f"write to {topics.model('doctor-probe', 'doctor-probe')}"] if forbidden is not None and forbidden < 0x80 else [])
            return CheckResult("topic permissions", "fail", f"the ACL is too open: this node could {'read ' if leaks else ''}{', '.join(what)}",
                               "the broker's acl_file was edited or replaced: regenerate it with `fbm-broker reload WORKSPACE`")
        return CheckResult("topic permissions", "ok", "reads and writes its own topics; other sites' and the models are refused")

    # --- the site ----------------------------------------------------------------------------------

    def check_clock(self, ctx: _Context) -> CheckResult:
        """Signed timestamps on the retained jobs/models say when their senders thought it was."""
        now = self.clock()
        newest = self._newest_peer_timestamp(ctx) if ctx.mqtt_ok else None
        if newest is not None and newest - now > MAX_SKEW_S:
            return CheckResult("clock", "fail", f"a message signed {newest - now:.0f} s in this machine's future: "
                               "this clock is behind", "enable time sync (chrony or systemd-timesyncd, NTP)")
        synced = _kernel_clock_synced()
        seen = "" if newest is None else f"; newest peer message {now - newest:.0f} s old"
        if synced is False:
            return CheckResult("clock", "warn", "the kernel says the clock is not NTP-synchronised" + seen,
                               "enable time sync (chrony or systemd-timesyncd); certificates and rounds use time")
        return CheckResult("clock", "ok", ("NTP-synchronised" if synced else "no peer ahead of this clock") + seen)

    def _newest_peer_timestamp(self, ctx: _Context) -> float | None:
        stamps: list[float] = []
        with self._session(ctx) as probe:
            probe.collect(topics.every("job"), lambda payload: stamps.append(_ts(payload)), wait_s=1.0)
        stamps = [s for s in stamps if s]
        return max(stamps) if stamps else None

    def check_datasets(self, ctx: _Context) -> CheckResult:
        from node.db import Database
        from node.registry import Registry

        assert ctx.settings is not None
        datasets = Registry(Database(ctx.settings.database)).list()
        if not datasets:
            return CheckResult("datasets", "warn", "no dataset registered: this node cannot take part in jobs",
                               f"fbm-node dataset add --dir {self.node_dir} --name ... --type ... --path ... --tag ...")
        bad = [f"{d.name} ({d.path}: {why})" for d in datasets if (why := _unreadable(Path(d.path)))]
        if bad:
            return CheckResult("datasets", "fail", "unreadable: " + "; ".join(bad),
                               "restore the files, fix their permissions for the node's user, or `fbm-node dataset remove`")
        return CheckResult("datasets", "ok", f"{len(datasets)} readable: {', '.join(d.name for d in datasets)}")

    def check_disk(self, ctx: _Context) -> CheckResult:
        assert ctx.settings is not None
        free = shutil.disk_usage(ctx.settings.node_dir).free / 1e9
        if free < self.min_free_gb:
            return CheckResult("disk", "fail", f"{free:.2f} GB free under {ctx.settings.node_dir} (< {self.min_free_gb:g} GB)",
                               "free space: models, checkpoints and the database need room")
        return CheckResult("disk", "ok", f"{free:.1f} GB free")

    def check_process(self, ctx: _Context) -> CheckResult:
        from node.db import Database
        from node.state import NodeState

        assert ctx.settings is not None
        beat = NodeState(Database(ctx.settings.database)).heartbeat()
        if beat is None or beat.age_s() > 15:
            return CheckResult("node process", "warn", "not running" if beat is None else f"silent for {beat.age_s():.0f} s",
                               f"start it: fbm-node start --dir {self.node_dir} (or systemctl start fbm-node)")
        state = "connected" if beat.connected else "NOT connected"
        return CheckResult("node process", "ok" if beat.connected else "warn", f"running, {state} to {beat.broker}")


class _Probe:
    """A short MQTT session (client id NAME:doctor, nothing kept) to ask the broker things."""

    def __init__(self, client, host: str, port: int, timeout_s: float) -> None:
        self.client, self.host, self.port, self.timeout_s = client, host, port, timeout_s
        self.connack: int | None = None
        self.connack_name = ""
        self.error = ""
        self._event = threading.Event()
        self._subacks: dict[int, int] = {}
        self._sub_event = threading.Condition()
        self._handlers: list[tuple[str, Callable[[bytes], None]]] = []
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_disconnect = lambda *a: self._event.set()

    def __enter__(self) -> _Probe:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        try:
            self.client.connect(self.host, self.port, keepalive=10, clean_start=True, properties=props)
        except (OSError, ssl.SSLError) as exc:
            self.error = str(exc)
            return self
        self.client.loop_start()
        self._event.wait(self.timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack, self.connack_name = reason_code.value, reason_code.getName()
        self._event.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._ack(mid, reason_codes[0].value)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._ack(mid, reason_code.value)

    def _ack(self, mid: int, code: int) -> None:
        with self._sub_event:
            self._subacks[mid] = code
            self._sub_event.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        import paho.mqtt.client as mqtt

        for topic_filter, handler in self._handlers:
            if mqtt.topic_matches_sub(topic_filter, msg.topic):
                handler(bytes(msg.payload))

    def _wait(self, mid: int) -> int | None:
        with self._sub_event:
            self._sub_event.wait_for(lambda: mid in self._subacks, self.timeout_s)
            return self._subacks.get(mid)

    def publish(self, topic: str, payload: bytes) -> int | None:
        """The PUBACK reason code (>= 0x80 refused); None without an answer."""
        if self.connack != 0:
            return None
        return self._wait(self.client.publish(topic, payload, qos=1).mid)

    def subscribe(self, topic: str) -> int | None:
        """The SUBACK reason code (0-2 granted, >= 0x80 refused); None without an answer."""
        if self.connack != 0:
            return None
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait(mid)

    def collect(self, topic: str, handler: Callable[[bytes], None], wait_s: float) -> None:
        """Pass what arrives on `topic` to `handler`; wait `wait_s` for retained messages."""
        self._handlers.append((topic, handler))
        if self.subscribe(topic) is not None and wait_s:
            time.sleep(wait_s)


def _ts(payload: bytes) -> float:
    """The (unverified) send time in a retained envelope; 0 for anything else. Only the flat
    header is read: anyone who may post a job could retain a body that grows when decoded."""
    from common.envelope import peek_header
    from common.errors import BadMessage

    try:
        ts = peek_header(payload).get("ts")
    except BadMessage:  # chunks, manifests, anything else: no timestamp
        return 0.0
    return float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else 0.0


def _unreadable(path: Path) -> str:
    if not path.exists():
        return "missing"
    if path.is_dir():
        try:
            next(os.scandir(path), None)
        except OSError as exc:
            return exc.strerror or str(exc)
        return ""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("pad", ctypes.c_byte * 200)]


def _kernel_clock_synced() -> bool | None:
    """adjtimex(2): False when the kernel marks the clock unsynchronised (STA_UNSYNC)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != 5  # TIME_ERROR: clock not synchronised
