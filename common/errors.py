"""One exception for every way a received message can be bad, with a machine-readable reason.

Receivers catch `BadMessage`, log `reason` and `detail`, drop the message and carry on.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a message was dropped (stable strings: they appear in logs and the audit trail)."""

    NOT_MSGPACK = "not_msgpack"
    BAD_ENVELOPE = "bad_envelope"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_BODY = "bad_body"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    BAD_CERT = "bad_cert"
    ROLE_NOT_ALLOWED = "role_not_allowed"
    WRONG_TOPIC = "wrong_topic"
    WRONG_OWNER = "wrong_owner"  # a job signed by someone else than its owner, or not theirs to touch
    REPLAYED = "replayed"  # a message already processed (the memory survives restarts)
    STALE = "stale"  # signed too long ago (or in the future) for a live message
    BAD_TENSOR = "bad_tensor"
    BAD_CHUNK = "bad_chunk"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    TOO_LARGE = "too_large"
    NOT_A_RECIPIENT = "not_a_recipient"  # sealed for others (common/sealed.py)
    BAD_SEAL = "bad_seal"  # sealed, but malformed or it does not decrypt


class BadMessage(Exception):
    """A received message that must be dropped, with the reason why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransportError(Exception):
    """The broker could not be reached, refused us, or refused a publish."""


class ConnectError(TransportError):
    """Connecting to the broker failed; the message says why and what to check."""


class PublishDenied(TransportError):
    """The broker refused a publish (MQTT 5 PUBACK reason code >= 0x80, e.g. 135 not authorized)."""

    def __init__(self, topic: str, reason_code: int, reason_name: str) -> None:
        super().__init__(f"publish to {topic!r} refused by the broker: {reason_name} ({reason_code})")
        self.topic = topic
        self.reason_code = reason_code


class NotReady(Exception):
    """Raised by a message handler that cannot take a message yet (e.g. its job is not known
    again after a restart): the message is not remembered as seen, so a re-send of the same
    id is processed. The message says why, for the log."""
