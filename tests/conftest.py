"""Shared fixtures: a real TLS Mosquitto on a free port, started from `fbm-broker init` config."""

from __future__ import annotations

import importlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from broker.local import LocalFederation
from common.identity import Identity
from common.logging import configure_logging
from common.messenger import Messenger
from common.settings import TransportSettings
from common.transport import Delivery, Transport

configure_logging("warning", json=True)

IDENTITIES = {
    "node-a": "node",
    "node-b": "node",
    "res-1": "researcher",
    "res-2": "researcher",
    "agg-1": "aggregator",
    "admin-1": "admin",
}


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(available: bool, what: str) -> None:
    """Skip a test whose dependency is missing on a developer's machine, and fail it under
    CI=true: a test that cannot run must not pass quietly (the set-up must install `what`)."""
    if available:
        return
    if under_ci():
        pytest.fail(f"missing dependency under CI=true: {what}", pytrace=False)
    pytest.skip(f"missing dependency: {what}")


def require_module(name: str, what: str):
    """`importlib.import_module(name)`, or `require(False, what)`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, what)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


class Inbox:
    """Collects deliveries from a Transport or messages from a Messenger, thread-safely."""

    def __init__(self) -> None:
        self.items: list = []
        self._lock = threading.Lock()

    def __call__(self, item) -> None:
        with self._lock:
            self.items.append(item)

    def topics(self) -> list[str]:
        with self._lock:
            return [i.topic for i in self.items]

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [bytes(i.payload) for i in self.items if isinstance(i, Delivery)]

    def wait_for(self, predicate: Callable[[list], bool], timeout_s: float = 10.0) -> bool:
        return wait_until(lambda: predicate(list(self.items)), timeout_s)


def _federation() -> Iterator[LocalFederation]:
    fed = LocalFederation().start()
    try:
        for name, role in IDENTITIES.items():
            fed.enroll(name, role)
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


@pytest.fixture(scope="session")
def federation() -> Iterator[LocalFederation]:
    """One broker shared by the integration tests that do not restart it."""
    yield from _federation()


@pytest.fixture
def own_federation() -> Iterator[LocalFederation]:
    """A broker of the test's own, for tests that restart or break it."""
    yield from _federation()


@pytest.fixture
def clients() -> Iterator[list]:
    """Connected Transports/Messengers to close after the test."""
    opened: list = []
    yield opened
    for client in opened:
        client.close()


def bundle(fed: LocalFederation, name: str) -> Identity:
    return Identity.load(fed.ws.bundle_dir(name))


def fast_settings(**overrides) -> TransportSettings:
    """Short timeouts; a clean session unless the test is about sessions (shared broker)."""
    return TransportSettings(**{"connect_timeout_s": 5, "publish_timeout_s": 30, "clean_start": True, **overrides})


def open_transport(fed, name, clients, inbox: Inbox | None = None, settings=None, **kw) -> Transport:
    transport = Transport(bundle(fed, name), settings or fast_settings(), on_delivery=inbox, **kw)
    transport.connect()
    clients.append(transport)
    return transport


def open_messenger(fed, name, clients, settings=None, **kw) -> Messenger:
    messenger = Messenger(bundle(fed, name), settings or fast_settings(), **kw)
    messenger.connect()
    clients.append(messenger)
    return messenger
