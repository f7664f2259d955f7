"""The dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright),
against a real Corral serving the real Gemma 3 270M."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.conftest import CorralProc, model_toml

pytestmark = pytest.mark.e2e

# What a view must come to show, it may take up to this long to (Playwright's default
# is 5 s): these tests check that the page gets there, not how fast, and a view that
# waits on a few calls to Corral and a debounce can pass 5 s on a machine running
# the whole suite beside other jobs.
expect.set_options(timeout=30_000)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("chromium not found: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def open_dashboard(browser: Browser, c: CorralProc) -> Page:
    page = browser.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(c.url + "/")  # redirects to /dashboard/
    assert page.url == c.url + "/dashboard/"
    assert not errors, errors
    return page


def test_dashboard_shows_models_and_load_unload_change_state(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(model_toml("gemma", gemma, aliases=["default"]))
    page = open_dashboard(browser, c)
    row = page.locator('#models tr[data-model="gemma"]')
    expect(row).to_contain_text("default")
    expect(row.locator(".state")).to_have_text("not-loaded")
    expect(page.locator("#status")).to_have_text("live")

    row.locator('button[data-action="load"]').click()
    expect(row.locator(".state")).to_have_text("loaded", timeout=60_000)
    instance = page.locator("#instances tr[data-instance]")
    expect(instance).to_have_count(1)
    expect(instance.locator(".state")).to_have_text("ready")

    # The live log of the instance: its start-up lines, then what it logs next.
    instance.locator("button").click()
    expect(page.locator("#log")).to_contain_text("llama", timeout=10_000)

    r = httpx.post(
        c.url + "/v1/chat/completions",
        timeout=120,
        headers={"X-Request-Id": "ui-1"},
        json={"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert r.status_code == 200
    latest = page.locator("#requests tbody tr").first
    expect(latest).to_contain_text("/v1/chat/completions")
    expect(latest).to_contain_text("ui-1")
    expect(latest).to_contain_text("gemma")

    row.locator('button[data-action="unload"]').click()
    expect(row.locator(".state")).to_have_text("not-loaded", timeout=60_000)
    expect(page.locator("#instances tr[data-instance]")).to_have_count(0)
    expect(page.locator("#log")).to_contain_text("[instance stopped]")
    expect(page.locator("#events")).to_contain_text("gemma stopped (unload)")


def test_dashboard_asks_for_the_api_key(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(model_toml("gemma", gemma), server='api_keys = ["dash-key"]')
    page = open_dashboard(browser, c)
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#status")).to_have_text("API key required")
    page.locator("#key-input").fill("dash-key")
    page.locator("#key-form button").click()
    expect(page.locator('#models tr[data-model="gemma"] .state')).to_have_text("not-loaded")
    expect(page.locator("#key-form")).to_be_hidden()
