"""A launch cancelled half-way from the dashboard, against the real llama-server (behind
a wrapper that makes its start slow): the child is killed, the call that waited for it
gets a clean error, the model is not marked failed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from tests.e2e.conftest import REPO, CorralProc, free_ports, model_toml, wait_until
from tests.e2e.test_dashboard_e2e import browser, open_dashboard
from tests.fakes import stop, wait_healthy

pytestmark = pytest.mark.e2e
_ = browser  # the Chromium fixture


@pytest.fixture
def slow_corral(tmp_path: Path, llama_server_bin: Path, gemma: Path) -> Iterator[CorralProc]:
    # The real llama-server, started 30 s late: a launch long enough to cancel.
    wrapper = tmp_path / "slow-llama-server"
    wrapper.write_text(f'#!/bin/sh\nsleep 30\nexec "{llama_server_bin}" "$@"\n')
    wrapper.chmod(0o755)
    port, oport, lport = free_ports(3)
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_port = {oport}\n'
        f'lmstudio_port = {lport}\n[scheduler]\nhealth_interval = 0.02\nload_timeout = 120\n'
        f'[llama_server]\nbinary = "{wrapper}"\n\n{model_toml("gemma", gemma)}')
    log_path = tmp_path / "corral.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    c = CorralProc(proc, port, oport, lport, log_path)
    try:
        wait_healthy(c.url, proc, log_path)
        yield c
    finally:
        stop(proc, 30)


def test_a_launch_cancelled_half_way_from_the_dashboard(
    slow_corral: CorralProc, browser: Browser
) -> None:
    c = slow_corral
    page = open_dashboard(browser, c)
    row = page.locator('#models tr[data-model="gemma"]')
    expect(row.locator(".state")).to_contain_text("not-loaded")
    waited: dict[str, httpx.Response] = {}

    def call() -> None:
        waited["r"] = httpx.post(c.url + "/v1/chat/completions", timeout=120, json={
            "model": "gemma", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})

    caller = threading.Thread(target=call)
    caller.start()
    try:
        expect(row.locator(".state")).to_contain_text("loading", timeout=20_000)
        wait_until(lambda: len(c.children()) == 1)
        child = c.children()[0]
        row.locator('button[data-action="cancel"]').click()
        expect(row.locator(".state")).to_contain_text("not-loaded", timeout=20_000)
    finally:
        caller.join(60)
    r = waited["r"]
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_load_cancelled"
    wait_until(lambda: c.children() == [], timeout=20)
    assert not Path(f"/proc/{child}").exists() or child not in c.children()
    model = httpx.get(c.url + "/admin/models/gemma").json()
    assert model["failures"] == 0 and model["last_error"] is None
    expect(page.locator("#instances tr[data-instance]")).to_have_count(0)
