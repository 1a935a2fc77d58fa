"""Issue 17, attack 7b: what a researcher writes into a plan, shown to the node's admin.

A class name with rich markup (`[red]...[/]`) was interpreted by `fbm-node plan show`; control
and bidirectional characters in the source (Trojan Source: U+202E reverses what follows; ESC
starts terminal escape sequences) reached the admin's terminal and browser raw, so the code
read was not the code run. Both doors must show them visibly instead.
"""

from __future__ import annotations

import http.cookiejar
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from click.testing import CliRunner

from broker.local import free_port
from broker.workspace import Workspace
from common.messages import PlanRef
from node.cli import main
from node.config import NodeSettings
from node.db import Database
from node.plans import PlanStore, plan_id, source_sha256
from tests.conftest import wait_until

CLASS = "Plan[red]Evil[/]"
SOURCE = 'access = "user\u202e \u2066# admin\u2069 \u2066"\nprint("\x1b[2J\x1b]0;owned\x07")\n'
RAW = ["\u202e", "\u2066", "\u2069", "\x1b", "\x07"]
SHOWN = ["⟨U+202E⟩", "⟨U+2066⟩", "⟨U+2069⟩", "⟨U+001B⟩", "⟨U+0007⟩"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A node folder holding one pending plan with a hostile class name and source."""
    root = tmp_path_factory.mktemp("display")
    ws = Workspace(root / "federation")
    ws.init("display", port=free_port(), bind="127.0.0.1")
    bundle = ws.enroll("site-d", "node")
    node_dir = root / "site"
    subprocess.run([sys.executable, "-m", "node", "init", str(node_dir), "--bundle", str(bundle)], check=True, capture_output=True)
    ref = PlanRef(source=SOURCE, sha256=source_sha256(SOURCE), class_name=CLASS)
    PlanStore(Database(NodeSettings.load(node_dir).database)).record_seen(ref, job="job-1", sender="res-1")
    return node_dir, plan_id(ref)


def test_plan_show_prints_markup_literally_and_control_characters_visibly(site):
    node_dir, pid = site
    result = CliRunner().invoke(main, ["plan", "show", pid, "--dir", str(node_dir)])
    assert result.exit_code == 0, result.output
    assert CLASS in result.output  # not styled red, not swallowed
    for raw, shown in zip(RAW, SHOWN, strict=True):
        assert raw not in result.output and shown in result.output, (repr(raw), result.output)
    listing = CliRunner().invoke(main, ["plan", "list", "--dir", str(node_dir)])
    assert listing.exit_code == 0 and "Plan[" in listing.output, listing.output  # (the table cuts the rest)


def _console_page(node_dir, pid: str) -> str:
    subprocess.run([sys.executable, "-m", "node", "user", "add", "steward", "--dir", str(node_dir), "--password-stdin"],
                   input="long enough pw\n", text=True, capture_output=True, check=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "node", "ui", "--dir", str(node_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        assert wait_until(lambda: _get(opener, base + "/healthz") is not None, 30)
        csrf = re.search(r'name="csrf" value="([^"]+)"', _get(opener, base + "/login")).group(1)
        form = urllib.parse.urlencode({"csrf": csrf, "next": "/", "username": "steward", "password": "long enough pw"})
        opener.open(base + "/login", data=form.encode(), timeout=10)
        return _get(opener, f"{base}/plans/{pid}")
    finally:
        proc.terminate()
        proc.wait(20)


def _get(opener, url: str) -> str | None:
    try:
        return opener.open(url, timeout=5).read().decode()
    except OSError:
        return None


def test_the_consoles_plan_page_shows_control_characters_visibly(site):
    node_dir, pid = site
    html = _console_page(node_dir, pid)
    assert "Plan[red]Evil[/]" in html
    for raw, shown in zip(RAW, SHOWN, strict=True):
        assert raw not in html and shown in html, (repr(raw), html)
