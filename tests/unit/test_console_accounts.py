"""The console's accounts, sessions, throttle and job summaries (no browser, no broker)."""

from __future__ import annotations

import time

import pytest

from node.db import Database
from node.ui.accounts import AccountError, Accounts, SessionPolicy, hash_password, verify_password
from node.ui.app import _local
from node.ui.views import browse, summarize_jobs


@pytest.fixture
def accounts(tmp_path):
    return Accounts(Database(tmp_path / "node.db"), SessionPolicy(idle_minutes=0.01, max_hours=1, max_failures=3,
                                                                   failure_window_s=30))  # lock-out expiry is checked with `now`, not a sleep


def test_passwords_are_stored_salted_and_verified():
    a, b = hash_password("a long password"), hash_password("a long password")
    assert a != b and "a long password" not in a
    assert verify_password("a long password", a)
    assert not verify_password("a long passwore", a)
    assert not verify_password("x", "md5$garbage")


def test_accounts_refuse_weak_or_duplicate_users(accounts):
    accounts.add_user("steward", "0123456789", "admin:root")
    with pytest.raises(AccountError, match="exists already"):
        accounts.add_user("steward", "0123456789", "admin:root")
    with pytest.raises(AccountError, match="at least 10"):
        accounts.add_user("other", "short", "admin:root")
    with pytest.raises(AccountError, match="invalid user name"):
        accounts.add_user("bad name", "0123456789", "admin:root")
    stored = accounts.db.execute("SELECT password_hash FROM ui_users")[0]["password_hash"]
    assert stored.startswith("scrypt$") and "0123456789" not in stored


def test_sessions_expire_when_idle_and_end_on_password_change(accounts):
    accounts.add_user("steward", "0123456789", "admin:root")
    assert accounts.login("steward", "wrong password", "1.2.3.4") is None
    s = accounts.login("steward", "0123456789", "1.2.3.4")
    assert s is not None and accounts.session(s.token).username == "steward"
    assert accounts.db.execute("SELECT token_sha256 FROM ui_sessions")[0]["token_sha256"] != s.token
    time.sleep(0.7)  # idle 0.01 min = 0.6 s
    assert accounts.session(s.token) is None
    s2 = accounts.login("steward", "0123456789", "1.2.3.4")
    accounts.set_password("steward", "another password")
    assert accounts.session(s2.token) is None


def test_failed_logins_lock_the_account_and_the_address_for_a_window(accounts):
    accounts.add_user("steward", "0123456789", "admin:root")
    for _ in range(3):
        accounts.login("steward", "nope", "10.0.0.1")
    assert accounts.locked_out("steward", "10.0.0.9")  # by account
    assert accounts.locked_out("someone", "10.0.0.1")  # by address
    assert not accounts.locked_out("someone", "10.0.0.9")
    assert not accounts.locked_out("steward", "10.0.0.1", now=time.time() + 31)  # the window has passed


def test_login_redirects_stay_on_this_site():
    assert _local("/plans?status=pending") == "/plans?status=pending"
    for evil in ("https://evil.example/", "//evil.example/x", "javascript:alert(1)", "plans"):
        assert _local(evil) == "/"


def test_jobs_are_summarized_from_the_audit_trail():
    entries = [
        {"id": 1, "ts": 1.0, "event": "job_pending", "job": "j1", "actor": "alice", "dataset": "fm", "plan_sha256": "p", "round": None, "detail": {}},
        {"id": 2, "ts": 2.0, "event": "job_accepted", "job": "j1", "actor": "alice", "dataset": "fm", "plan_sha256": "p", "round": None, "detail": {}},
        {"id": 3, "ts": 3.0, "event": "round_trained", "job": "j1", "actor": None, "dataset": "fm", "plan_sha256": "p", "round": 1, "detail": {"train_s": 1.5, "n_samples": 10}},
        {"id": 4, "ts": 4.0, "event": "round_failed", "job": "j1", "actor": None, "dataset": None, "plan_sha256": None, "round": 2, "detail": {"error": "boom"}},
        {"id": 5, "ts": 5.0, "event": "job_refused", "job": "j2", "actor": "bob", "dataset": None, "plan_sha256": None, "round": None, "detail": {"reason": "no dataset"}},
        {"id": 6, "ts": 6.0, "event": "node_started", "job": None, "actor": "n", "dataset": None, "plan_sha256": None, "round": None, "detail": {}},
    ]
    j2, j1 = summarize_jobs(list(reversed(entries)))
    assert (j1.state, j1.researcher, j1.trained, j1.train_s, j1.dataset) == ("accepted", "alice", 1, 1.5, "fm")
    assert [(r.round, r.ok, r.error) for r in j1.rounds] == [(1, True, ""), (2, False, "boom")]
    assert (j2.state, j2.reason) == ("refused", "no dataset")


def test_the_file_picker_lists_folders_and_files_and_says_why_not(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / ".hidden").write_text("")
    listing = browse(str(tmp_path), tmp_path)
    assert (listing.dirs, listing.files, listing.parent) == (["sub"], ["a.csv"], str(tmp_path.parent))
    assert "cannot list" in browse(str(tmp_path / "missing"), tmp_path).error
