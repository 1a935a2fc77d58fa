"""mosquitto.conf for a federation broker: every limit chosen deliberately and explained."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class BrokerLimits(BaseModel):
    """Broker limits; the defaults and the reasons are in the generated file's comments."""

    max_packet_bytes: int = Field(default=65 * 1024 * 1024, ge=1024 * 1024)
    max_queued_messages: int = Field(default=10_000, ge=100)
    max_queued_bytes: int = Field(default=2 * 1024**3, ge=0)
    session_expiry: str = Field(default="30d", pattern=r"^\d+[hdwmy]$")
    autosave_interval_s: int = Field(default=60, ge=1)


def mosquitto_conf(*, port: int, bind: str, broker_dir: Path, limits: BrokerLimits, user: str | None) -> str:
    """The configuration text (Mosquitto 2.0)."""
    d = broker_dir
    user_line = f"user {user}" if user else "# user: unset (not started as root)"
    listener = f"listener {port} {bind}".rstrip()
    return f"""\
# Written by `fbm-broker init`; regenerate rather than edit (fbm-broker init --force).
per_listener_settings false
{user_line}

# Nobody gets in without a client certificate from the federation CA, AND the fbm_auth
# plugin admits a client only if its username is its certificate's name, its client id is
# that name (or NAME:suffix), and the name is not revoked (re-checked on SIGHUP).
allow_anonymous false
acl_file {d / "acl"}
plugin {d / "fbm_auth.so"}
plugin_opt_revoked_file {d / "revoked"}

# Persistence: sessions, queued QoS-1 messages and retained jobs/models survive a restart.
# A hard kill loses what changed since the last autosave, so the protocol re-sends
# (see docs/mqtt-facts.md); autosave_on_changes would make big queues ~50x slower.
persistence true
persistence_location {d / "data"}/
autosave_interval {limits.autosave_interval_s}

# Abandoned sessions (a site that never comes back) are dropped after this long.
persistent_client_expiration {limits.session_expiry}

# Queue limits for offline clients. Overflow is dropped silently by Mosquitto, so they are
# generous: 10,000 messages or 2 GiB per client. Bulk (models) is retained, never queued.
max_queued_messages {limits.max_queued_messages}
max_queued_bytes {limits.max_queued_bytes}
max_inflight_messages 20

# Bodies are chunked at 1 MiB by the clients; this refuses anything far larger.
max_packet_size {limits.max_packet_bytes}
set_tcp_nodelay true

log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true

{listener}
protocol mqtt
cafile {d / "ca.crt"}
certfile {d / "server.crt"}
keyfile {d / "server.key"}
tls_version tlsv1.2
require_certificate true
# The username is checked against the certificate by fbm_auth (use_identity_as_username
# would bypass every plugin, and with it client-id binding and revocation).
use_identity_as_username false
"""
