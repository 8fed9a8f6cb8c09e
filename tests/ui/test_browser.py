"""The web pages in a real headless Chromium, over a real federation run.

A coordinator subprocess (task ``breast_cancer``) and two ``fedsilo-silo run``
subprocesses doing real DP-SGD rounds fill the database; then Selenium drives
Debian's ``chromium`` through ``chromedriver``: sign in, open every page, filter the
log, press Verify on the intact log and on a tampered copy of the database, and try
an admin form as an auditor. Every step saves a screenshot (1280x800) under
``$FEDSILO_SCREENSHOTS`` or ``tests-artifacts/screenshots/``.

Without chromium these tests skip, except in CI (``CI=true``), where they fail:
``.ci/run`` installs the browser.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from datetime import UTC, datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from privacy.keys import Identity, signing_public_from_raw
from silo_node.config import SiloConfig
from silo_node.partition import write_partitions
from silo_node.witness import witness_once
from tests.integration.test_silos import ROUND, child_env, enrol_in_process, finish, start
from tests.support.coordinator import FakeSilo, running_coordinator, serve_coordinator

pytestmark = pytest.mark.slow

FEDERATION = "cardiology-study"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path(os.environ.get("FEDSILO_SCREENSHOTS") or Path(__file__).parents[2] / "tests-artifacts" / "screenshots")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,800", "--hide-scrollbars"]


@pytest.fixture(scope="module", autouse=True)
def _browser_installed() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator:
    """Two real silos, two DP rounds each, on non-IID partitions of breast_cancer."""
    tmp = tmp_path_factory.mktemp("browser-run")
    parts = write_partitions("breast_cancer", tmp / "parts", 2, alpha=0.5, seed=11)
    with running_coordinator(tmp / "coordinator", task="breast_cancer", task_options={"hidden": [8]},
                             name=FEDERATION) as server:
        dirs = [enrol_in_process(server, tmp, name, data, epsilon_cap=cap)
                for name, data, cap in zip(("hospital-north", "hospital-south"), parts.paths, (6.0, 4.0))]
        runs = [start("run", "--data-dir", str(d), "--rounds", "2", *ROUND, env=child_env()) for d in dirs]
        for done in map(finish, runs):
            assert done.returncode == 0, done.stderr[-2000:]
        # One more silo sends a well-formed, signed update on a version that does not
        # exist: the coordinator refuses it (unknown_base_version), as it would a buggy client.
        stray = FakeSilo.create(server, "hospital-west")
        assert stray.push(stray.seal(stray.delta(seed=1), base_version=999)).status_code >= 400
        with server.client() as http:  # a checkpoint, and both hospitals witness it
            for data_dir in dirs:
                config = SiloConfig.load(data_dir, environ={})
                witness_once(http, accepted=None, federation_name=FEDERATION, silo_id=config.enrolment.silo_id,
                             log_key=signing_public_from_raw(config.enrolment.coordinator_keys.signing),
                             key=Identity.load(config.keys_dir).signing, now=datetime.now(UTC))
        r = server.admin("POST", "/tokens", json={"name": "compliance", "role": "auditor"})
        assert r.status_code == 201, r.text
        server.auditor_token = r.json()["token"]
        yield server


@pytest.fixture
def browser(tmp_path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    # The page area itself at 1280x800 (a window of that size has less room for the page).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def find(driver, by: str, value: str):
    """The element, waiting for the page a click started to load."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 60).until(expected_conditions.presence_of_element_located((by, value)))


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def sign_in(driver, base_url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/ui/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    find(driver, By.TAG_NAME, "nav")
    assert driver.current_url == f"{base_url}/ui/", driver.page_source[:500]
    assert token not in driver.current_url


def test_sign_in_and_open_every_page(federation, browser):
    from selenium.webdriver.common.by import By

    base = federation.base_url
    browser.get(f"{base}/ui/login")
    shot(browser, "01-sign-in")
    sign_in(browser, base, federation.admin_token)
    version = int(browser.find_element(By.ID, "current-version").text)
    assert version >= 4  # two silos, two rounds each
    assert browser.find_element(By.CSS_SELECTOR, "svg polyline")  # the accuracy plot has a line
    shot(browser, "02-overview")

    browser.get(f"{base}/ui/silos")
    rows = browser.find_element(By.ID, "silos").text
    assert "hospital-north" in rows and "hospital-south" in rows and "agrees" in rows
    shot(browser, "03-silos")

    browser.get(f"{base}/ui/log")
    assert "update_accepted" in browser.find_element(By.ID, "events").text
    shot(browser, "04-audit-log")
    browser.find_element(By.PARTIAL_LINK_TEXT, "update:").click()
    page = find(browser, By.ID, "update").text
    assert "base version" in page and "ε before → after" in page
    assert browser.find_element(By.ID, "receipt").text.startswith("{")
    shot(browser, "06-update")

    browser.get(f"{base}/ui/checkpoints")
    assert "2 witness cosignatures" in browser.find_element(By.CLASS_NAME, "checkpoint").text
    shot(browser, "07-checkpoints")
    browser.get(f"{base}/ui/settings")
    shot(browser, "10-settings")
    browser.get(f"{base}/ui/silos/new")
    browser.find_element(By.NAME, "name").send_keys("hospital-east")
    browser.find_element(By.CSS_SELECTOR, "#new-silo button").click()
    assert len(find(browser, By.ID, "enrolment-token").text) >= 32
    shot(browser, "11-new-silo")


def test_filter_the_log(federation, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sign_in(browser, federation.base_url, federation.auditor_token)
    browser.get(f"{federation.base_url}/ui/log")
    Select(browser.find_element(By.ID, "f-silo")).select_by_visible_text("hospital-south")
    Select(browser.find_element(By.ID, "f-action")).select_by_visible_text("update_accepted")
    browser.find_element(By.ID, "apply").click()
    WebDriverWait(browser, 60).until(expected_conditions.url_contains("action=update_accepted"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#events tr")[1:]
    assert len(rows) == 2  # two rounds
    assert all("hospital-south" in r.text and "update_accepted" in r.text for r in rows)
    shot(browser, "05-audit-log-filtered")


def test_verify_an_intact_log(federation, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, federation.base_url, federation.auditor_token)
    browser.get(f"{federation.base_url}/ui/checkpoints")
    browser.find_element(By.ID, "verify").click()
    result = find(browser, By.ID, "verify-result")
    assert result.text.startswith("Intact") and "ok" in result.get_attribute("class")
    shot(browser, "08-verify-intact")


def test_verify_a_tampered_copy_names_the_altered_entry(federation, browser, tmp_path):
    from selenium.webdriver.common.by import By

    copy = tmp_path / "tampered"
    shutil.copytree(federation.data_dir / "keys", copy / "keys")
    config = (federation.data_dir / "coordinator.toml").read_text()
    (copy / "coordinator.toml").write_text(config.replace(str(federation.data_dir.resolve()), str(copy.resolve())))
    with sqlite3.connect(federation.data_dir / "coordinator.db") as src, \
            sqlite3.connect(copy / "coordinator.db") as dst:
        src.backup(dst)  # a consistent copy while the server runs
        dst.execute("DROP TRIGGER audit_events_no_update")
        seq = dst.execute("SELECT min(seq) FROM audit_events WHERE action = 'update_accepted'").fetchone()[0]
        dst.execute("UPDATE audit_events SET actor = 'someone-else' WHERE seq = ?", (seq,))
    with serve_coordinator(copy, init=federation.init) as tampered:
        sign_in(browser, tampered.base_url, federation.auditor_token)
        browser.get(f"{tampered.base_url}/ui/checkpoints")
        browser.find_element(By.ID, "verify").click()
        result = find(browser, By.ID, "verify-result")
        assert "bad" in result.get_attribute("class")
        assert f"failed at seq {seq}" in result.text and "hash_mismatch" in result.text
        shot(browser, "09-verify-tampered")


def test_an_auditor_cannot_post_an_admin_form(federation, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, federation.base_url, federation.auditor_token)
    before = federation.admin("GET", "/silos").json()
    browser.get(f"{federation.base_url}/ui/silos/new")
    button = browser.find_element(By.CSS_SELECTOR, "#new-silo button")
    assert not button.is_enabled()
    browser.find_element(By.NAME, "name").send_keys("auditor-was-here")
    # Re-enable the button as a curious auditor might with the developer tools.
    browser.execute_script("arguments[0].disabled = false", button)
    button.click()
    assert "forbidden" in find(browser, By.ID, "error").text
    assert "Not allowed" in browser.find_element(By.TAG_NAME, "h1").text
    shot(browser, "12-auditor-refused")
    assert federation.admin("GET", "/silos").json() == before
