"""The web UI in a real browser (Debian's chromium driven by Playwright) against the real stack."""

from __future__ import annotations

import shutil

import pytest
import requests

from tests.conftest import ARTIFACTS
from tests.support import wait_for, wait_for_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    yield page
    context.close()


def submit_form(page, base_url: str, prompt: str, max_new_tokens: int) -> None:
    """Fill the form, submit, and wait until the job page shows some text."""
    page.goto(base_url + "/")
    page.fill("#inputs", prompt)
    page.fill("#max_new_tokens", str(max_new_tokens))
    page.click("button[type=submit]")
    page.wait_for_url("**/jobs/*")
    page.wait_for_function("document.getElementById('output').textContent.length > 0", timeout=30_000)


def test_submit_via_the_form_and_watch_the_text_arrive(slow_stack, page):
    submit_form(page, slow_stack.url, "مرحبا بالعالم 你好 Once upon a time", 120)
    page.wait_for_function("document.getElementById('status').textContent === 'succeeded'", timeout=60_000)
    job_id = page.url.rsplit("/", 1)[-1]
    job = requests.get(f"{slow_stack.url}/api/v1/jobs/{job_id}", timeout=5).json()
    assert page.text_content("#output") == job["output"]["generated_text"]
    assert page.get_attribute("#inputs", "dir") == "auto" and page.get_attribute("#output", "dir") == "auto"
    assert page.text_content("#inputs") == "مرحبا بالعالم 你好 Once upon a time"  # not mangled
    assert page.evaluate("getComputedStyle(document.getElementById('inputs')).direction") == "rtl"  # Arabic first
    assert page.get_attribute("#progress", "value") == page.get_attribute("#progress", "max")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)
    # The recent-jobs list on the form shows this job.
    page.goto(slow_stack.url + "/")
    assert page.is_visible("#recent") and job_id in page.inner_html("#recent-list")


def test_cancel_a_long_job_from_its_page(slow_stack, page):
    submit_form(page, slow_stack.url, "Once upon a time", 1500)
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'canceled'", timeout=30_000)
    assert page.text_content("#output")  # the partial text stays
    assert page.is_hidden("#cancel")


def test_invalid_parameters_show_the_message_next_to_the_field(slow_stack, page):
    page.goto(slow_stack.url + "/")
    page.fill("#inputs", "Hello")
    page.fill("#top_p", "5")
    page.click("button[type=submit]")
    message = page.wait_for_selector('[data-field="parameters.top_p"]')
    assert "less than or equal to 1" in message.text_content()
    assert page.input_value("#inputs") == "Hello"


def test_story_preset_builds_the_prompt(slow_stack, page):
    page.goto(slow_stack.url + "/")
    page.check('input[name="preset"][value="story"]')
    assert page.is_hidden("#inputs") and page.is_visible("#title")
    page.fill("#title", "a lighthouse keeper")
    page.fill("#max_new_tokens", "5")
    page.click("button[type=submit]")
    page.wait_for_url("**/jobs/*")
    assert page.text_content("#inputs") == "This is a creative story about a lighthouse keeper.\n"
    wait_for(lambda: page.text_content("#status") == "succeeded", timeout=30, what="the story job")


def test_the_usage_page_charts_the_tokens_of_finished_jobs(slow_stack, page):
    job = slow_stack.submit("Usage, please", parameters={"max_new_tokens": 4})
    done = wait_for_job(slow_stack.url, job["id"])
    page.goto(slow_stack.url + "/usage")
    bars = page.locator("#usage-chart rect.bar")
    assert bars.count() >= 1
    heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
    assert all(h > 0 for h in heights)
    box = page.locator("#usage-chart").bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 80  # drawn, at a readable size
    model = done["model"]
    assert model in page.text_content("figure.chart figcaption")
    table = page.text_content("#usage-table")
    assert model in table
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "usage-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000


def test_the_dashboard_shows_the_fleet_and_updates_itself(slow_stack, page):
    wait_for_job(slow_stack.url, slow_stack.submit("Before the dashboard", parameters={"max_new_tokens": 4})["id"])
    page.goto(slow_stack.url + "/dashboard")
    card = page.locator(".model-card").first
    model = card.get_attribute("data-model")
    assert model and model in page.text_content("#models")
    finished = card.locator('[data-figure="finished_last_5m"]')
    before = int(finished.text_content())
    assert before >= 1
    assert page.locator("#workers tbody tr").count() >= 1 and "No live worker" not in page.text_content("#workers")
    points = card.locator('svg[data-series="tokens_per_minute"] polyline').get_attribute("points")
    assert len(points.split()) == 15 and any(float(p.split(",")[1]) < 58 for p in points.split())  # drawn, not flat
    # Live: another job finishes and the number changes on the open page, without a reload.
    wait_for_job(slow_stack.url, slow_stack.submit("While it is open", parameters={"max_new_tokens": 4})["id"])
    page.wait_for_function(
        f"Number(document.querySelector('.model-card [data-figure=\"finished_last_5m\"]').textContent) > {before}",
        timeout=20_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000
