"""A test whose dependency is missing skips on a developer's machine and fails under CI=true."""

from __future__ import annotations

import pytest

from tests.conftest import require, require_module


def test_a_missing_dependency_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        require(False, "chromium")


def test_a_missing_dependency_fails_under_ci_naming_it(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing dependency under CI=true: chromium"):
        require(False, "chromium")
    with pytest.raises(pytest.fail.Exception, match="no-such-module"):
        require_module("no_such_module_here", "no-such-module")


def test_a_present_dependency_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    require(True, "anything")
    assert require_module("json", "json").dumps([]) == "[]"
