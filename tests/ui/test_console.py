"""The node's web console in real headless Chromium (Debian's), against a real node, broker and job.

The steward logs in, adds a CSV dataset with the file picker, sees a pending plan arrive from a
researcher's job, approves it, and sees the node train the job's rounds; wrong passwords, pages
without a session, forged forms and repeated failures are refused. Each page is screenshotted
(into FBM_SCREENSHOTS, default reports/node-ui) for docs/node-ui.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from broker.local import LocalFederation, free_port
from common.identity import Identity
from node.audit import AuditTrail
from node.db import Database
from researcher.experiment import Experiment
from scripts import fmnist
from tests.conftest import require, require_module, wait_until

pytestmark = pytest.mark.e2e
playwright_api = require_module("playwright.sync_api", "the playwright package (pip install -e '.[dev]'; `make test` does)")

CHROMIUM = os.environ.get("FBM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "correct horse battery"
SHOTS = Path(os.environ.get("FBM_SCREENSHOTS", Path(__file__).resolve().parents[2] / "reports" / "node-ui"))
PLAN = '''
from common.training.zoo import MLPPlan

class StewardReviewedMLP(MLPPlan):
    """A researcher's plan the site's steward must approve (the zoo MLP under another name)."""
'''


@pytest.fixture(scope="module")
def site():
    require(Path(CHROMIUM).exists(), f"Debian's chromium at {CHROMIUM} (apt-get install chromium; `make setup` does)")
    fed = LocalFederation().start()

    try:
        shards = fmnist.write_shards(fed.root / "data", 1, limit=300, seed=3)
        node_dir = fed.add_node("site-ui", fed.shard_datasets(["site-ui"], shards)["site-ui"],
                                env={"FBM_NODE_PLAN_POLL_S": "0.5"})
        fed.add_aggregator("agg-ui")
        fed.enroll("alice", "researcher")
        subprocess.run([sys.executable, "-m", "node", "user", "add", "steward", "--dir", str(node_dir), "--password-stdin"],
                       input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        csv_dir = fed.root / "data" / "cohort"
        csv_dir.mkdir()
        rng = np.random.default_rng(0)
        rows = np.column_stack([rng.integers(40, 90, 60), rng.normal(26, 4, 60).round(1), rng.integers(0, 2, 60)])
        np.savetxt(csv_dir / "cohort.csv", rows, delimiter=",", header="age,bmi,outcome", comments="", fmt="%g")
        port = free_port()
        fed.spawn("ui", [sys.executable, "-m", "node", "ui", "--dir", str(node_dir), "--port", str(port),
                              "--browse-start", str(csv_dir.parent)])
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _up(base), 30), (fed.root / "logs" / "ui.log").read_text()
        fed.wait_online({"site-ui"})
        yield fed, node_dir, base
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.on("dialog", lambda d: d.accept())
    yield pg
    context.close()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _login(page, base: str, password: str = PASSWORD) -> None:
    page.goto(base + "/login")
    page.fill("#username", "steward")
    page.fill("#password", password)
    page.click("#login")


def _events(node_dir: Path, job: str | None = None) -> list[str]:
    return [e["event"] for e in AuditTrail(Database(node_dir / "node.db")).entries(job)]


def test_a_page_without_a_session_redirects_to_login(site, page):
    _, _, base = site
    for path in ("/datasets", "/plans", "/status"):
        page.goto(base + path)
        assert "/login" in page.url
        assert page.locator("#login").is_visible()
    _shot(page, "login")


def test_a_wrong_password_is_refused(site, page):
    _, node_dir, base = site
    _login(page, base, password="not the password")
    assert "/login" in page.url
    assert "Wrong user name or password" in page.locator(".error").inner_text()
    assert page.locator("#logout").count() == 0
    assert "ui_login_failed" in _events(node_dir)


def test_steward_adds_a_csv_dataset_and_sees_its_metadata(site, page):
    _, node_dir, base = site
    _login(page, base)
    assert page.url.endswith("/datasets")
    _shot(page, "datasets-before")
    page.click("#add-dataset")
    # the picker: open the folder, then click the file to fill the path field
    page.click("#picker a:has-text('cohort/')")
    page.click("#picker a.use:has-text('cohort.csv')")
    assert page.input_value("#ds-path").endswith("cohort/cohort.csv")
    page.fill("#ds-name", "cohort")
    page.select_option("#ds-type", "csv")
    page.fill("#ds-tags", "cohort, heart")
    page.fill("#ds-target", "outcome")
    page.fill("#ds-description", "60 synthetic patients")
    _shot(page, "dataset-add")
    page.click("#ds-submit")
    assert page.url.endswith("/datasets/cohort")
    assert page.locator("#n-samples").inner_text() == "60"
    assert page.locator("#features").inner_text() == "age, bmi"
    assert page.locator("#preview tbody tr").count() == 8
    _shot(page, "dataset-csv")
    # the npz shard registered from the CLI previews as images
    page.goto(base + "/datasets/fm")
    assert page.locator("#preview img").count() == 8
    _shot(page, "dataset-images")
    page.goto(base + "/datasets")
    assert page.locator("#datasets tbody tr").count() == 2
    _shot(page, "datasets")
    # one source of truth: the CLI sees what the console did, and the audit names the account
    listed = subprocess.run([sys.executable, "-m", "node", "dataset", "list", "--dir", str(node_dir), "--json"],
                            capture_output=True, text=True, check=True).stdout
    assert '"cohort"' in listed
    added = [e for e in AuditTrail(Database(node_dir / "node.db")).entries() if e["event"] == "dataset_added"]
    assert added[0]["actor"] == "ui:steward"

    # a bad file is refused with the loader's reason, and nothing is registered
    page.goto(base + "/datasets/new")
    page.fill("#ds-name", "broken")
    page.select_option("#ds-type", "npz")
    page.fill("#ds-path", str(Path(added[0]["detail"]["path"])))
    page.fill("#ds-tags", "x")
    page.click("#ds-submit")
    assert "not a readable .npz file" in page.locator(".error").inner_text()
    page.goto(base + "/datasets")
    assert page.locator("#datasets tbody tr").count() == 2


def test_a_key_file_as_a_dataset_shows_no_file_content(site, page):
    """Pointed at the node's own key, or a copy of it elsewhere, the form's error quotes nothing
    of the file (issue 19: it used to show the first bad cell, a line of the private key)."""
    fed, node_dir, base = site
    key = node_dir / "bundle" / "identity.key"
    copy = fed.root / "data" / "exported.key"
    shutil.copyfile(key, copy)
    secrets = [line.strip() for line in key.read_text().splitlines() if line.strip()]
    _login(page, base)
    for path, kind, expected in [(key, "csv", "inside this node's own folder"), (copy, "csv", "not a number"),
                                 (copy, "npy", "not a readable .npy file")]:
        page.goto(base + "/datasets/new")
        page.fill("#ds-name", "leak")
        page.select_option("#ds-type", kind)
        page.fill("#ds-path", str(path))
        page.fill("#ds-tags", "x")
        page.click("#ds-submit")
        error = page.locator(".error").inner_text()
        assert expected in error, error
        shown = page.content()
        assert not [line for line in secrets if line in shown], "the page shows a line of the private key"
        assert "PRIVATE KEY" not in shown
    _shot(page, "dataset-key-refused")
    page.goto(base + "/datasets")
    assert "leak" not in page.locator("#datasets").inner_text()


def test_a_pending_plan_is_approved_and_the_node_joins_the_job(site, page, tmp_path):
    fed, node_dir, base = site
    plan = tmp_path / "reviewed_plan.py"
    plan.write_text(PLAN)
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan=plan, plan_class="StewardReviewedMLP",
                     tags=["fmnist"], rounds=2, quorum=1, round_deadline_s=90, aggregator_identity="agg-ui",
                     model_args={"in_features": 784, "hidden": [16], "n_classes": 10},
                     training_args={"epochs": 1, "lr": 0.05, "batch_size": 50}, seed=2)
    job = exp.submit()
    try:
        assert wait_until(lambda: "job_pending" in _events(node_dir, job), 30)
        _login(page, base)
        page.goto(base + "/plans?status=pending")
        row = page.locator("#plans tbody tr", has_text="StewardReviewedMLP")
        assert row.count() == 1
        assert "alice" in row.inner_text()
        _shot(page, "plans-pending")
        row.locator("a").first.click()
        assert page.locator("#plan-status").inner_text() == "pending"
        assert "class StewardReviewedMLP" in page.locator("#plan-source").inner_text()
        _shot(page, "plan-review")
        page.fill("form[action$='/approve'] input[name=note]", "read it: the zoo MLP")
        page.click("#approve")
        assert page.locator("#plan-status").inner_text() == "approved"
        assert "now approved" in page.locator(".flash").inner_text()

        state = exp.watch(timeout_s=120, progress=False)
        assert state.status == "done", state.reason
        assert [[rep["node"] for rep in r["reports"]] for r in state.history] == [["site-ui"], ["site-ui"]]
        page.goto(base + "/jobs")
        job_row = page.locator("#jobs tbody tr", has_text=job)
        assert wait_until(lambda: "done" in job_row.inner_text() or (page.reload() and False), 10)
        assert re.search(r"\b2\b", job_row.locator("td").nth(5).inner_text())
        _shot(page, "jobs")
        job_row.locator("a").first.click()
        assert page.locator("#rounds tbody tr").count() == 2
        _shot(page, "job")
        decided = [e for e in AuditTrail(Database(node_dir / "node.db")).entries() if e["event"] == "plan_approved"]
        assert decided[0]["actor"] == "ui:steward" and decided[0]["detail"]["note"] == "read it: the zoo MLP"
        page.goto(base + "/audit?actor=ui%3A")
        assert page.locator("#audit tbody tr", has_text="plan_approved").count() == 1
        _shot(page, "audit")
        page.goto(base + "/status")
        status = page.locator("#status").inner_text()
        assert re.search(r"broker connection\s+● connected to localhost:\d+", status), status
        assert "valid until" in status and page.locator("#status tr.fail").count() == 0
        _shot(page, "status")
    finally:
        exp.close()


def test_logout_ends_the_session(site, page):
    _, _, base = site
    _login(page, base)
    page.click("#logout")
    assert "/login" in page.url
    page.goto(base + "/plans")
    assert "/login" in page.url


def test_a_form_without_the_csrf_token_is_refused(site, page):
    _, node_dir, base = site
    _login(page, base)
    response = page.request.post(base + "/datasets/cohort/remove", form={"csrf": "forged"})
    assert response.status == 403
    response = page.request.post(base + "/datasets/cohort/remove", form={})
    assert response.status == 403
    assert "cohort" in subprocess.run([sys.executable, "-m", "node", "dataset", "list", "--dir", str(node_dir)],
                                      capture_output=True, text=True, check=True).stdout
    # and the session's pages carry the headers that forbid framing and foreign scripts
    got = page.request.get(base + "/datasets")
    assert "frame-ancestors 'none'" in got.headers["content-security-policy"]


def test_repeated_failures_lock_the_login(site, page):
    """Runs last: the lock-out also holds for this address, so the right password is refused too."""
    _, node_dir, base = site
    for _ in range(5):
        _login(page, base, password="guess " + str(time.time()))
    _login(page, base)
    assert "Too many failed logins" in page.locator(".error").inner_text()
    assert page.locator("#logout").count() == 0
    assert "ui_login_refused" in _events(node_dir)
