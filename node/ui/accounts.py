"""The web console's local accounts, sessions and login throttle, kept in the node's SQLite.

Passwords are stored as scrypt hashes; a session cookie holds a random token whose sha256 is
what the database keeps (a copied database gives no live session). Each session has its own
CSRF token, an idle timeout and an absolute lifetime. Failed logins are counted per account and
per client address; past the limit, logins are refused for the rest of the window.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field

from node.db import Database

_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # with fullmatch, not match + `$`
MIN_PASSWORD = 10
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class AccountError(ValueError):
    """An account that cannot be created or changed; the message says why."""


class SessionPolicy(BaseModel):
    """How long sessions live and how many failed logins are tolerated."""

    idle_minutes: float = Field(default=30, gt=0, description="a session unused this long is closed")
    max_hours: float = Field(default=12, gt=0, description="a session is closed this long after login, used or not")
    max_failures: int = Field(default=5, ge=1, description="failed logins per account or address in a window")
    failure_window_s: float = Field(default=900, gt=0, description="the window failed logins are counted over")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=64 * 1024 * 1024, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                         maxmem=64 * 1024 * 1024)
    return hmac.compare_digest(got.hex(), digest)


# a hash to compare against when the account does not exist, so timing does not tell
_DUMMY_HASH = hash_password(secrets.token_hex(8))


@dataclass(frozen=True)
class Session:
    token: str
    username: str
    csrf: str
    created_at: float
    last_seen: float


class Accounts:
    """Users, sessions and failed logins of one node's console."""

    def __init__(self, db: Database, policy: SessionPolicy | None = None) -> None:
        self.db = db
        self.policy = policy or SessionPolicy()

    # --- users (created from the CLI) ----------------------------------------------------------

    def add_user(self, username: str, password: str, created_by: str) -> None:
        if not _USERNAME.fullmatch(username):
            raise AccountError(f"invalid user name {username!r}: 1-64 letters, digits, . _ @ -")
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
        if self.exists(username):
            raise AccountError(f"user {username!r} exists already (use `fbm-node user passwd`)")
        self.db.execute("INSERT INTO ui_users (username, password_hash, created_at, created_by) VALUES (?, ?, ?, ?)",
                        (username, hash_password(password), time.time(), created_by))

    def set_password(self, username: str, password: str) -> None:
        if not self.exists(username):
            raise AccountError(f"no user {username!r}")
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
        self.db.execute("UPDATE ui_users SET password_hash = ? WHERE username = ?", (hash_password(password), username))
        self.db.execute("DELETE FROM ui_sessions WHERE username = ?", (username,))

    def remove_user(self, username: str) -> None:
        if not self.exists(username):
            raise AccountError(f"no user {username!r}")
        self.db.execute("DELETE FROM ui_users WHERE username = ?", (username,))
        self.db.execute("DELETE FROM ui_sessions WHERE username = ?", (username,))

    def exists(self, username: str) -> bool:
        return bool(self.db.execute("SELECT 1 FROM ui_users WHERE username = ?", (username,)))

    def users(self) -> list[dict]:
        return self.db.execute("SELECT username, created_at, created_by FROM ui_users ORDER BY username")

    # --- login ---------------------------------------------------------------------------------

    def locked_out(self, username: str, client: str, now: float | None = None) -> bool:
        since = (now or time.time()) - self.policy.failure_window_s
        rows = self.db.execute(
            "SELECT SUM(username = ?) AS by_user, SUM(client = ?) AS by_client FROM ui_login_failures WHERE ts > ?",
            (username, client, since))
        by_user, by_client = (rows[0]["by_user"] or 0), (rows[0]["by_client"] or 0)
        return max(by_user, by_client) >= self.policy.max_failures

    def login(self, username: str, password: str, client: str) -> Session | None:
        """A new session, or None for a wrong name or password (counted towards the lock-out)."""
        rows = self.db.execute("SELECT password_hash FROM ui_users WHERE username = ?", (username,))
        ok = verify_password(password, rows[0]["password_hash"] if rows else _DUMMY_HASH) and bool(rows)
        now = time.time()
        if not ok:
            self.db.execute("INSERT INTO ui_login_failures (ts, username, client) VALUES (?, ?, ?)", (now, username, client))
            self.db.execute("DELETE FROM ui_login_failures WHERE ts < ?", (now - self.policy.failure_window_s,))
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.db.execute("INSERT INTO ui_sessions (token_sha256, username, csrf, created_at, last_seen) VALUES (?, ?, ?, ?, ?)",
                        (_digest(token), username, csrf, now, now))
        return Session(token, username, csrf, now, now)

    def session(self, token: str | None, touch: bool = True) -> Session | None:
        """The live session for a cookie token; expired ones are deleted."""
        if not token:
            return None
        rows = self.db.execute("SELECT * FROM ui_sessions WHERE token_sha256 = ?", (_digest(token),))
        if not rows:
            return None
        row, now = rows[0], time.time()
        if now - row["last_seen"] > self.policy.idle_minutes * 60 or now - row["created_at"] > self.policy.max_hours * 3600:
            self.logout(token)
            return None
        if touch:
            self.db.execute("UPDATE ui_sessions SET last_seen = ? WHERE token_sha256 = ?", (now, _digest(token)))
        return Session(token, row["username"], row["csrf"], row["created_at"], now)

    def logout(self, token: str) -> None:
        self.db.execute("DELETE FROM ui_sessions WHERE token_sha256 = ?", (_digest(token),))

    def flash(self, session: Session, message: str | None = None) -> str:
        """Set a one-time message shown on the next page (message given), or take it (none)."""
        if message is not None:
            self.db.execute("UPDATE ui_sessions SET flash = ? WHERE token_sha256 = ?", (message, _digest(session.token)))
            return message
        rows = self.db.execute("SELECT flash FROM ui_sessions WHERE token_sha256 = ?", (_digest(session.token),))
        if rows and rows[0]["flash"]:
            self.db.execute("UPDATE ui_sessions SET flash = '' WHERE token_sha256 = ?", (_digest(session.token),))
            return rows[0]["flash"]
        return ""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
