"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against a real `bitplan serve` on a free port: sign in, a bad budget's message on the
form, a plan created through the form and watched to the end, its per-layer table, compress,
download (sha256 checked), and team B seeing none of team A's pages. Screenshots go under the
test's temp dir (screens/)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.helpers.server import live_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HAVE_BROWSER = CHROMIUM.exists() and CHROMEDRIVER.exists()
# skipped where no browser could be installed, except in CI (BITPLAN_REQUIRE_SERVICES=1)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_BROWSER and not os.environ.get("BITPLAN_REQUIRE_SERVICES"),
                                 reason="chromium/chromedriver missing: `make install` adds them")]


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.execute_cdp_cmd("Page.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.implicitly_wait(10)   # find_element waits for a submitted form's next page
    driver.downloads = downloads
    driver.screens = tmp_path / "screens"
    driver.screens.mkdir()
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> Path:
    path = driver.screens / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _wait(pred, timeout: float, what: str, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _sign_in(driver, base: str, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/ui/models")
    assert driver.current_url.endswith("/ui/login")       # not signed in: sent to sign in
    driver.find_element(By.ID, "api_key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    _wait(lambda: driver.current_url.endswith("/ui/models"), 10, "the models page")


def _submit_plan(driver, base: str, budget: str, unit: str) -> None:
    driver.get(f"{base}/ui/plans/new?model=tiny-qwen")
    field = driver.find_element(By.ID, "budget")
    field.clear()
    field.send_keys(budget)
    Select(driver.find_element(By.ID, "unit")).select_by_value(unit)
    driver.find_element(By.ID, "submit-plan").click()


def test_dashboard_plan_compress_download_and_isolation(tmp_path, model_root, tiny_model,
                                                        browser):
    d = browser
    with live_server(tmp_path / "server", model_root) as srv:
        # a wrong key is refused on the form
        d.get(f"{srv.url}/ui/login")
        d.find_element(By.ID, "api_key").send_keys("bp_nope_nope")
        d.find_element(By.ID, "sign-in").click()
        assert "unknown or revoked" in d.find_element(By.ID, "error").text

        _sign_in(d, srv.url, srv.keys["alpha"])
        assert d.find_element(By.ID, "team-name").text == srv.teams["alpha"]
        cookie = d.get_cookie("bitplan_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # a bad budget: the form comes back with a clear message, nothing is queued
        _submit_plan(d, srv.url, "lots", "")
        err = d.find_element(By.ID, "form-error").text
        assert "cannot parse budget 'lots'" in err and "3.25bpp" in err, err
        _submit_plan(d, srv.url, "0.001", "x")
        err = d.find_element(By.ID, "form-error").text
        assert "is below the minimum feasible" in err and "feasible budgets are" in err, err
        _shot(d, "bad_budget")
        d.get(f"{srv.url}/ui/jobs")
        assert "No jobs yet" in d.find_element(By.ID, "jobs").text

        # a good one: redirected to the plan page, which shows progress until it is solved
        _submit_plan(d, srv.url, "0.85", "x")
        # (the form's own URL is /ui/plans/new?…: wait for the plan's)
        _wait(lambda: re.search(r"/ui/plans/[0-9a-f]{32}$", d.current_url), 30, "the plan page")
        plan_url = d.current_url
        plan_id = plan_url.rsplit("/", 1)[1]
        assert d.find_elements(By.CSS_SELECTOR, ".progress[data-job]"), "no live progress"
        _shot(d, "plan_progress")
        _wait(lambda: d.find_elements(By.ID, "linears"), 180, "the solved plan (JS reload)")
        rows = d.find_elements(By.CSS_SELECTOR, "#linears tbody tr")
        assert len(rows) == 15                       # the tied embedding, 2 blocks × 7 linears
        assert "model.embed_tokens" in rows[0].text
        assert "model.layers.0.self_attn.q_proj" in rows[1].text
        # a row per block, and one for what is in no block (the embedding)
        assert len(d.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")) == 3
        assert d.find_element(By.ID, "plan-status").text == "solved"
        assert "of the budget" in d.find_element(By.ID, "plan-bytes").text

        # compress: progress, then measured vs predicted and the download
        d.find_element(By.ID, "compress").click()
        _wait(lambda: d.find_elements(By.ID, "download"), 240, "the compressed artifact")
        real = int(d.find_element(By.ID, "real-bytes").text)
        planned = int(d.find_element(By.CSS_SELECTOR, "#measured tr:nth-child(4) td").text)
        assert real == planned                                   # every byte accounted for
        shot = _shot(d, "plan_page")
        if os.environ.get("BITPLAN_UPDATE_SCREENSHOT"):   # refresh the README's figure
            shutil.copy(shot, Path(__file__).resolve().parents[2] / "docs" / "ui_plan.png")
        digest = d.find_element(By.ID, "sha256").text
        d.find_element(By.ID, "download").click()
        tar = _wait(lambda: [p for p in d.downloads.glob("*.tar")], 60, "the download")[0]
        _wait(lambda: not list(d.downloads.glob("*.crdownload")), 60, "the download to end")
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == digest

        # team B sees none of it: the plan page, its JSON and its download are 404
        _sign_in(d, srv.url, srv.keys["beta"])
        d.get(plan_url)
        assert d.find_element(By.ID, "error-title").text == "Not found"
        assert d.find_element(By.ID, "error").get_attribute("data-code") == "not_found"
        _shot(d, "team_b_404")
        d.get(f"{srv.url}/v1/plans/{plan_id}")
        assert '"not_found"' in d.find_element(By.TAG_NAME, "body").text
        d.get(f"{srv.url}/ui/jobs")
        assert "No jobs yet" in d.find_element(By.ID, "jobs").text
        d.get(f"{srv.url}/ui/models")
        mid = d.find_element(By.CSS_SELECTOR, "#models a").get_attribute("href").rsplit("/", 1)[1]
        d.get(f"{srv.url}/ui/models/{mid}")                     # models are shared, plans not
        assert plan_id[:8] not in d.find_element(By.ID, "plans").text
    assert len(list((tmp_path / "screens").glob("*.png"))) == 4
