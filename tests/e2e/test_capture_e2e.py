"""Captures, cancel, replay and raw passthrough through the real llama-server (issue 27).

The model runs with ``--ignore-eos``: a long call cannot end by itself, so only the
cancel can free its slot. The slot is watched through the passthrough itself
(``/upstream/gemma/slots``, llama-server's own ``GET /slots``), probed once after the
cancel: a probe is a task of llama-server's, and a non-streaming call is noticed gone
only after a second without any result (tests/e2e/test_hangups_e2e.py). The dashboard
test drives the Requests view in headless Chromium.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from tests.e2e.conftest import CorralProc, model_toml, wait_until
from tests.e2e.test_dashboard_e2e import browser, open_dashboard

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, used by name

# A stream's end is noticed at llama-server's next token; a whole answer's after a
# second without a result (llama-server's own check).
STREAM_CHECK = 1.0
WHOLE_CHECK = 1.5
LONG = 900  # fits the 1,024-token context; minutes at this machine's pace
CAPTURE = 'capture = { memory = "4MiB" }'


def start(corral: Callable[..., CorralProc], gemma: Path) -> CorralProc:
    return corral(model_toml("gemma", gemma, chat_template="gemma3", args=["--ignore-eos"]),
                  server=CAPTURE)


def processing(c: CorralProc) -> bool:
    slots = httpx.get(c.url + "/upstream/gemma/slots", timeout=10).json()
    return any(s["is_processing"] for s in slots)


def in_flight(c: CorralProc, rid: str) -> bool:
    body = httpx.get(c.url + "/admin/requests", timeout=10).json()
    return any(e["request_id"] == rid for e in body["in_flight"])


def long_call(c: CorralProc, rid: str, stream: bool, out: dict[str, object]) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", c.url + "/v1/chat/completions", timeout=300,
                          headers={"X-Request-Id": rid}, json={
                              "model": "gemma", "max_tokens": LONG, "stream": stream,
                              "messages": [{"role": "user", "content": "Tell a long story."}]},
                          ) as resp:
            out["status"] = resp.status_code
            out["text"] = resp.read().decode()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_cancel_frees_the_slot_stream_or_not(
    corral: Callable[..., CorralProc], gemma: Path
) -> None:
    c = start(corral, gemma)
    for rid, stream, check in (("long-stream", True, STREAM_CHECK),
                               ("long-whole", False, WHOLE_CHECK)):
        out: dict[str, object] = {}
        t = long_call(c, rid, stream, out)
        wait_until(lambda rid=rid: in_flight(c, rid), timeout=60, step=0.1)
        # Generating (a probe of /slots while the call runs, once it holds the slot).
        wait_until(lambda: processing(c), timeout=60, step=0.25)
        if stream:
            # A capture is readable while its call runs: words have come.
            wait_until(lambda rid=rid: bool(httpx.get(f"{c.url}/admin/requests/{rid}", timeout=10)
                                            .json()["answer"]["assembled"]["text"]),
                       timeout=60, step=0.25)
        resp = httpx.post(f"{c.url}/admin/requests/{rid}/cancel", timeout=10)
        assert resp.status_code == 200 and resp.json()["cancelled"] is True
        t.join(30)
        assert not t.is_alive(), f"{rid}: the client's call did not end"
        if stream:
            assert out["status"] == 200
            last = [ln for ln in str(out["text"]).splitlines() if ln.startswith("data: ")][-1]
            assert "cancelled by an operator" in json.loads(last[6:])["error"]["message"]
        else:
            assert out["status"] == 499
            assert json.loads(str(out["text"]))["error"]["code"] == "cancelled"
        time.sleep(check)
        assert not processing(c), f"{rid}: llama-server still generating after the cancel"
        # The capture says so, with what had come of the answer and its timings.
        view = httpx.get(f"{c.url}/admin/requests/{rid}", timeout=10).json()
        assert view["cancelled"] is True and not view["in_flight"]
        if stream:
            assert view["answer"]["assembled"]["text"]
            assert view["timings"]["first_token_seconds"] is not None


def test_a_captured_call_and_its_replay(corral: Callable[..., CorralProc], gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, chat_template="gemma3")
               + model_toml("again", gemma, chat_template="gemma3"), server=CAPTURE)
    resp = httpx.post(c.url + "/v1/chat/completions", timeout=120, headers={
        "X-Request-Id": "story-1"}, json={"model": "gemma", "max_tokens": 8, "stream": True,
                                          "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200
    view = httpx.get(c.url + "/admin/requests/story-1", timeout=10).json()
    text = view["answer"]["assembled"]["text"]
    assert text and text in "".join(
        json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
        for ln in resp.text.splitlines()
        if ln.startswith("data: {") and json.loads(ln[6:]).get("choices"))
    t = view["timings"]
    # The model was not loaded: its launch is in the breakdown.
    assert t["launch_seconds"] > 0 and t["first_token_seconds"] > t["launch_seconds"]
    assert view["tokens"]["completion"] == 8 and view["tokens"]["prompt"] > 0
    curl = httpx.get(c.url + "/admin/requests/story-1/curl", timeout=10).text
    assert curl.startswith("curl ") and "max_tokens" in curl and "/v1/chat/completions" in curl
    out = httpx.post(c.url + "/admin/requests/story-1/replay", json={"model": "again"},
                     timeout=120).json()
    assert out["status"] == 200 and out["answer"]["choices"][0]["message"]["content"]
    replayed = httpx.get(f"{c.url}/admin/requests/{out['request_id']}", timeout=10).json()
    assert replayed["upstream"]["model"] == "again"


def test_llama_servers_own_pages_through_the_passthrough(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    # Corral starts llama-server with --no-webui; a model's args turn it back on. The
    # llama.cpp source on the index carries no built web UI (its "/" is a 404), so
    # llama-server serves its page from --path, as it would serve its own UI.
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><html><head><title>llama.cpp - chat"
                                     "</title></head><body></body></html>")
    web = ["--webui", "--path", str(site)]
    c = corral(model_toml("gemma", gemma, chat_template="gemma3", args=web)
               + model_toml("lazy", gemma, chat_template="gemma3", args=web,
                            passthrough_launch="root"))
    page = httpx.get(c.url + "/upstream/gemma/", timeout=120)  # launches gemma
    assert page.status_code == 200, page.text
    assert "text/html" in page.headers["content-type"]
    assert "<title>llama.cpp - chat</title>" in page.text
    props = httpx.get(c.url + "/upstream/gemma/props", timeout=10).json()
    assert props["default_generation_settings"]["n_ctx"] == 1024
    # Root-only: an asset's request does not load it; the page does.
    assert httpx.get(c.url + "/upstream/lazy/props", timeout=10).status_code == 409
    assert httpx.get(c.url + "/upstream/lazy/", timeout=120).status_code == 200
    assert httpx.get(c.url + "/upstream/lazy/props", timeout=10).status_code == 200


def test_dashboard_cancels_a_call_and_shows_its_capture(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = start(corral, gemma)
    page = open_dashboard(browser, c)
    page.locator("#tab-requests").click()
    out: dict[str, object] = {}
    t = long_call(c, "from-page", True, out)
    row = page.locator('#rq-inflight tr[data-id="from-page"]')
    expect(row).to_be_visible(timeout=60_000)
    wait_until(lambda: processing(c), timeout=60, step=0.25)
    row.locator("button.cancel").click()
    t.join(30)
    assert not t.is_alive() and "cancelled by an operator" in str(out["text"])
    time.sleep(STREAM_CHECK)
    assert not processing(c)
    expect(row).to_have_count(0)
    page.locator('#rq-recent tr[data-id="from-page"] button.open').click()
    expect(page.locator("#rq-detail")).to_be_visible()
    expect(page.locator("#rq-detail-title")).to_contain_text("cancelled")
    expect(page.locator("#rq-timings")).to_contain_text("first token")
    expect(page.locator("#rq-bodies")).to_contain_text("Tell a long story.")
    expect(page.locator("#rq-bodies")).to_contain_text("$CORRAL_API_KEY")
    # Replay with a short answer: shown in the page.
    httpx.post(c.url + "/v1/chat/completions", timeout=120, headers={"X-Request-Id": "short"},
               json={"model": "gemma", "max_tokens": 3,
                     "messages": [{"role": "user", "content": "Hi"}]})
    page.locator('#rq-recent tr[data-id="short"] button.open').click()
    expect(page.locator("#rq-detail-title")).to_contain_text("short")
    page.locator("#rq-replay button[type=submit]").click()
    expect(page.locator("#rq-replay-answer")).to_contain_text("HTTP 200", timeout=60_000)
    expect(page.locator("#rq-replay-answer")).to_contain_text("chat.completion")
