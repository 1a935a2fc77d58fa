"""Third-party rules arrive through the `fedbiomq.aggregators` entry-point group."""

from __future__ import annotations

import sys

import pytest
import torch

from aggregators.rules import base
from tests.plugin_site import install_example_plugin


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(base, "_plugins_loaded", False)
    monkeypatch.setattr(base, "_RULES", dict(base._RULES))
    monkeypatch.setattr(base, "_BROKEN", {})
    yield


def test_an_installed_plugin_is_listed_and_runs(fresh_registry, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_example_plugin(tmp_path / "site")))
    assert "geomedian" in base.rule_names()
    rule = base.get_rule("geomedian", {"iterations": 50})
    assert not rule.streaming
    rule.begin_round({"w": torch.zeros(2)})
    for point in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1000.0, 1000.0]):
        rule.add({"w": torch.tensor(point)}, 1, "n")
    out = rule.end_round()["w"]
    assert out.dtype == torch.float32 and float(out.norm()) < 1.5  # the mean would be ~250
    sys.modules.pop("fbm_geomedian", None)


def test_a_broken_plugin_is_reported_not_fatal(fresh_registry, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_example_plugin(tmp_path / "site", "oops = fbm_missing:Nothing")))
    assert "fedavg" in base.rule_names()
    assert "oops" in base.broken_plugins()
    with pytest.raises(ValueError, match="failed to load"):
        base.get_rule("oops")


def test_the_rules_command_lists_plugins(tmp_path):
    import os
    import subprocess

    site = install_example_plugin(tmp_path / "site")
    out = subprocess.run([sys.executable, "-m", "aggregators", "rules"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "geomedian" in out.stdout and "fedavg" in out.stdout and "N x model" in out.stdout
