"""Transport settings shared by every role, passed explicitly (no globals).

Each service's own settings embed these; environment variables `FBM_MQTT_*` override them.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.chunking import DEFAULT_CHUNK_SIZE, Limits

MQTT_MAX_PACKET = 268_435_455


class TransportSettings(BaseSettings):
    """How to reach the broker and how to behave on the wire."""

    model_config = SettingsConfigDict(env_prefix="FBM_MQTT_", extra="ignore")

    host: str | None = Field(default=None, description="broker host (default: from the bundle)")
    port: int | None = Field(default=None, description="broker TLS port (default: from the bundle)")
    keepalive_s: int = Field(default=20, ge=5, description="MQTT keepalive; the Last Will fires after ~1.5x")
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, description="how long the broker keeps our session while we are away")
    clean_start: bool = Field(default=False, description="False keeps the session (queued messages) across restarts")
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=64 * 1024 * 1024)
    max_message_bytes: int = Field(default=4 * 1024**3, description="largest payload we send or accept")
    connect_timeout_s: float = Field(default=15.0, gt=0)
    publish_timeout_s: float = Field(default=120.0, gt=0)
    reconnect_min_s: int = Field(default=1, ge=1)
    reconnect_max_s: int = Field(default=30, ge=1)
    max_inflight: int = Field(default=20, ge=1)
    reassembly_max_bytes: int = Field(default=2 * 1024**3, ge=1, description="bytes all incomplete chunked messages may hold")
    reassembly_topic_max_bytes: int | None = Field(
        default=None, ge=1,
        description="bytes the incomplete messages of one topic may hold (default 2 x max_message_bytes, "
                    "never above reassembly_max_bytes); the sender is unknown until the signature is checked")
    reassembly_topic_max_partial: int = Field(default=4, ge=1, description="incomplete chunked messages one topic may have at once")
    reassembly_max_partial: int = Field(default=4096, ge=1, description="incomplete chunked messages in all")
    seal: bool = Field(default=True, description="encrypt jobs, models and updates end to end to their recipients "
                                                  "(FBM_MQTT_SEAL=false turns it off, for benchmarks only)")
    model_wraps_max: int = Field(
        default=32, ge=0,
        description="an aggregator's model for more readers carries only its owner's key wrap, and each node is "
                    "given the model's content key once (job_key) instead of N wraps in each of N deliveries")
    dedupe_window: int = Field(default=20_000, ge=100, description="message ids remembered to drop duplicates")
    max_message_age_s: float = Field(
        default=8 * 24 * 3600.0, gt=0,
        description="a live (not retained) message signed longer ago is dropped as stale; longer than "
                    "session_expiry_s, or what our session queued while we were away would be")
    max_clock_skew_s: float = Field(default=300.0, ge=0, description="how far in the future a signed timestamp may be")

    def reassembly_limits(self) -> Limits:
        """What the receiver's chunk reassembler may hold (see chunking.Limits)."""
        topic = self.reassembly_topic_max_bytes or 2 * self.max_message_bytes
        return Limits(max_bytes=self.reassembly_max_bytes, stream_bytes=min(topic, self.reassembly_max_bytes),
                      stream_partial=self.reassembly_topic_max_partial, max_partial=self.reassembly_max_partial,
                      message_bytes=self.max_message_bytes)
