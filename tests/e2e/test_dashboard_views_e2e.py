"""The dashboard's charts, playground, config editor, models and keys views in headless
Chromium (Debian's ``chromium``, driven by Playwright), against a real Corral serving
the real Gemma 3 270M. Chart assertions read the page's data (window.corralCharts),
not pixels. Each test writes screenshots of the views it drives under
tests/e2e/artifacts/ (git-ignored) for people to look at."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from scheduler.config.root import ModelConfig
from tests.e2e.conftest import REPO, CorralProc, model_toml, wait_until
from tests.e2e.test_dashboard_e2e import browser, open_dashboard

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, used by name

ARTIFACTS = REPO / "tests" / "e2e" / "artifacts"
# A 1×1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def shot(page: Page, name: str, *, phone: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)
    if phone:
        size = page.viewport_size
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}-phone.png"), full_page=True)
        if size:
            page.set_viewport_size(size)


def gemma_model(gemma: Path, **keys: object) -> str:
    return model_toml("gemma", gemma, aliases=["default"], chat_template="gemma3", **keys)


def chat(c: CorralProc, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(c.url + "/v1/chat/completions", timeout=120, json={
        "model": "gemma", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hi"}]})


def test_charts_receive_points_after_known_traffic(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(gemma_model(gemma))
    page = open_dashboard(browser, c)
    page.set_viewport_size({"width": 1280, "height": 900})
    # A model's name in the overview opens its charts.
    page.locator('#models tr[data-model="gemma"] a.model-link').click()
    expect(page.locator("#view-charts")).to_be_visible()
    expect(page.locator("#chart-model")).to_have_value("gemma")
    page.locator("#chart-model").select_option("")
    page.locator("#tab-overview").click()
    # Keyboard: the tabs answer the arrow keys.
    page.locator("#tab-overview").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-charts")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#view-charts")).to_be_visible()
    expect(page.locator("#tab-charts")).to_be_focused()

    for _ in range(3):
        assert chat(c).status_code == 200

    def requests_charted() -> float:
        # The uPlot chart's own data: [t, one array per model].
        return float(page.evaluate("""() => {
            const ch = window.corralCharts.charts.requests;
            if (!ch) return 0;
            const i = ch.series.findIndex((s) => s.label === "gemma");
            return i < 0 ? 0 : ch.data[i].reduce((a, v) => a + (v || 0), 0);
        }"""))

    def situation() -> str:
        page_state = page.evaluate("""() => {
            const s = window.corralCharts, last = s.last;
            return {active: s.active, key: s.lastKey, uplot: typeof uPlot,
                    status: document.querySelector("#chart-status").textContent,
                    t: last && last.t.slice(-8), requests: last && last.requests};
        }""")
        served = httpx.get(c.url + "/admin/timeseries?window=60", timeout=10).json()
        return (f"page {page_state}; Corral's last samples: t {served['t'][-8:]}, "
                f"requests {served['requests']}; Corral's log: {c.log()[-3000:]}")

    wait_until(lambda: requests_charted() >= 3, timeout=15, step=0.25, state=situation)
    assert requests_charted() == 3
    # Later polls only append the new seconds: nothing counted twice, time in order.
    before = page.evaluate("() => window.corralCharts.last.t.length")
    wait_until(lambda: page.evaluate("() => window.corralCharts.last.t.length") >= before + 2,
               timeout=10, step=0.25)
    assert requests_charted() == 3
    t = page.evaluate("() => window.corralCharts.last.t")
    assert t == sorted(set(t))
    generated = ("() => window.corralCharts.last.tokens.completion"
                 ".reduce((a, v) => a + (v || 0), 0)")
    wait_until(lambda: page.evaluate(generated) > 0, timeout=15, step=0.25)
    last = page.evaluate("() => window.corralCharts.last")
    assert any(v is not None for v in last["duration"]["p50"])
    assert max(last["instances"]["ready"]) == 1
    assert page.locator(".chart").count() == 10
    expect(page.locator("#chart-requests .u-legend")).to_contain_text("gemma")
    expect(page.locator("#chart-memory .now")).to_contain_text("RAM used")

    # No layout jump: live updates leave every chart where it was, at its size.
    boxes = "() => [...document.querySelectorAll('.chart')].map((c) => { " \
        "const r = c.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })"
    before_boxes = page.evaluate(boxes)
    seen = page.evaluate("() => window.corralCharts.last.t.length")
    wait_until(lambda: page.evaluate("() => window.corralCharts.last.t.length") >= seen + 2,
               timeout=10, step=0.25)
    assert page.evaluate(boxes) == before_boxes

    # Hover: the legend shows the values under the cursor.
    plot = page.locator("#chart-requests .u-over")
    box = plot.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] / 2)
    expect(page.locator("#chart-requests .u-legend .u-series").nth(1)).to_contain_text("/s")

    # The model filter applies to every chart: the answer holds that model only.
    page.locator("#chart-model").select_option("gemma")
    wait_until(lambda: page.evaluate("() => window.corralCharts.last.models") == ["gemma"],
               timeout=10, step=0.25)
    shot(page, "charts", phone=True)


def test_a_poll_left_unanswered_does_not_stop_the_charts(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(gemma_model(gemma))
    page = open_dashboard(browser, c)
    held: list[Route] = []

    def hold_the_first(route: Route) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)  # never answered, as a request lost on the way

    page.route("**/admin/timeseries*", hold_the_first)
    page.evaluate("() => { window.corralCharts.timeoutMs = 1500; }")
    page.locator("#tab-charts").click()
    wait_until(lambda: bool(page.evaluate(
        "() => window.corralCharts.last && window.corralCharts.last.t.length")),
        timeout=15, step=0.25)
    assert len(held) == 1
    expect(page.locator("#chart-status")).to_contain_text("s of samples")
    page.close()


def test_playground_streams_in_every_family_and_stop_frees_the_slot(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    # "seer" claims vision (it has no projector, so llama-server will refuse the image:
    # what is tested is that the image travels in each family's shape).
    seer = model_toml("seer", gemma, chat_template="gemma3", capabilities=["chat", "vision"])
    c = corral(gemma_model(gemma, parallel=1) + seer)
    page = open_dashboard(browser, c)
    page.locator("#tab-playground").click()
    expect(page.locator("#pg-model option")).to_have_count(2)
    page.locator("#pg-model").select_option("gemma")  # not loaded: the first call loads it
    page.locator("#pg-max").fill("8")
    # Gemma 3 270M takes no images: the attach control says so instead of failing later.
    expect(page.locator("#pg-image")).to_be_disabled()
    for family in ("openai", "responses", "anthropic", "ollama"):
        page.locator("#pg-family").select_option(family)
        page.locator("#pg-send").click()
        expect(page.locator("#pg-state")).to_have_text("done", timeout=90_000)
        assert page.locator("#pg-output").inner_text().strip(), family
        assert page.locator("#pg-ttft").inner_text().endswith(" ms"), family
        assert '"model": "gemma"' in page.locator("#pg-request").inner_text()
        # The exact answer as it came (in a closed <details>: read its text, not what shows).
        raw = page.locator("#pg-response").text_content() or ""
        assert raw.startswith("HTTP 200") and ("data:" in raw or '"done":true' in raw), raw
    shot(page, "playground", phone=True)
    # From the keyboard: Ctrl+Enter in the message sends it.
    page.evaluate("() => { document.querySelector('#pg-output').textContent = '';"
                  " document.querySelector('#pg-state').textContent = ''; }")
    page.locator("#pg-prompt").focus()
    page.keyboard.press("Control+Enter")
    expect(page.locator("#pg-state")).to_have_text("done", timeout=60_000)
    expect(page.locator("#pg-output")).not_to_be_empty()

    # An image attached for a vision model goes in the request; an error is shown as such.
    page.locator("#pg-model").select_option("seer")
    expect(page.locator("#pg-image")).to_be_enabled()
    page.locator("#pg-image").set_input_files(files=[{
        "name": "dot.png", "mimeType": "image/png", "buffer": PNG}])
    page.locator("#pg-family").select_option("openai")
    wait_until(lambda: bool(page.evaluate("() => window.corralPlayground.image")), timeout=5)
    page.locator("#pg-send").click()
    expect(page.locator("#pg-state")).not_to_have_text("sending…", timeout=60_000)
    expect(page.locator("#pg-state")).not_to_have_text("streaming…", timeout=60_000)
    request = page.locator("#pg-request").text_content() or ""
    assert '"type": "image_url"' in request and "data:image/png;base64," in request
    state = page.locator("#pg-state").inner_text()
    assert state == "done" or state.startswith("error: "), state
    httpx.post(c.url + "/admin/models/seer/unload", timeout=30)
    page.locator("#pg-model").select_option("gemma")
    expect(page.locator("#pg-image")).to_be_disabled()

    # A long answer, stopped once it streams: the slot is free again at once.
    page.locator("#pg-family").select_option("openai")
    # OpenAI's family refuses a max_tokens its context cannot hold: 900 fit the 1,024.
    page.locator("#pg-max").fill("900")
    page.locator("#pg-prompt").fill("Tell a very long story about a llama.")
    page.locator("#pg-send").click()
    expect(page.locator("#pg-state")).to_have_text("streaming…", timeout=60_000)
    wait_until(lambda: len(page.locator("#pg-output").inner_text()) > 20, timeout=30, step=0.1)

    def in_flight() -> int:
        insts = httpx.get(c.url + "/admin/instances", timeout=10).json()["instances"]
        return sum(int(i["in_flight"]) for i in insts)

    assert in_flight() == 1
    page.locator("#pg-stop").click()
    expect(page.locator("#pg-state")).to_have_text("stopped")
    wait_until(lambda: in_flight() == 0, timeout=5, step=0.05)
    # One slot only, and llama-server stopped generating (not after the 900 tokens):
    # its slot is idle, and a new call is served.
    base = httpx.get(c.url + "/admin/instances", timeout=10).json()["instances"][0]["base_url"]
    wait_until(lambda: not any(s["is_processing"] for s in
                               httpx.get(base + "/slots", timeout=10).json()), timeout=5, step=0.5)
    assert chat(c, max_tokens=2).status_code == 200


def test_config_edit_refused_with_the_error_shown_then_applied(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(gemma_model(gemma), server="admin_config_write = true")
    page = open_dashboard(browser, c)
    page.locator("#tab-config").click()
    editor = page.locator("#cfg-text")
    expect(editor).not_to_be_empty()
    original = editor.input_value()
    assert "[[models]]" in original
    expect(page.locator("#cfg-message")).to_contain_text("same as the running file")

    # A schema error, shown at its line; Apply refuses it.
    bad = original + (
        '\n[[models]]\nname = "friend"\nremotes = ["http://127.0.0.1:9"]\nparallel = 0\n')
    editor.fill(bad)
    line = len(bad.splitlines())
    expect(page.locator("#cfg-errors li")).to_have_count(1)
    expect(page.locator("#cfg-errors li")).to_contain_text(f"line {line}")
    expect(page.locator("#cfg-errors li")).to_contain_text("greater than or equal to 1")
    expect(page.locator("#cfg-gutter .bad")).to_have_text(str(line))
    page.locator("#cfg-apply").click()
    expect(page.locator("#cfg-message")).to_contain_text("Not applied")
    shot(page, "config-error", phone=True)

    # A new local model that names a file no model serves: refused over HTTP, said
    # at the line. (Reusing the served Gemma file is allowed: nothing new runs.)
    local = original + '\n[[models]]\nname = "friend"\npath = "/etc/passwd"\n'
    editor.fill(local)
    expect(page.locator("#cfg-errors li")).to_contain_text("refused over HTTP")
    page.locator("#cfg-apply").click()
    expect(page.locator("#cfg-message")).to_contain_text("Not applied")
    assert "friend" not in [m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]]

    # A valid edit: a variant of the served model (its file and template, a smaller
    # context) is added. A remote would not be: a URL is where Corral connects.
    good = original + (f'\n[[models]]\nname = "friend"\npath = "{gemma.resolve()}"\n'
                       'chat_template = "gemma3"\nctx_size = 512\n')
    editor.fill(good)
    expect(page.locator("#cfg-message")).to_contain_text("adds friend")
    expect(page.locator("#cfg-diff")).to_contain_text('+name = "friend"')
    page.locator("#cfg-apply").click()
    expect(page.locator("#cfg-message")).to_contain_text("Applied", timeout=20_000)
    ids = [m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]]
    assert "friend" in ids
    shot(page, "config-applied")

    # ...and shows in the models view with its source, next to Gemma's facts.
    page.locator("#tab-models").click()
    friend = page.locator('#catalog tr[data-model="friend"]')
    expect(friend).to_contain_text("path")
    g = page.locator('#catalog tr[data-model="gemma"]')
    expect(g).to_contain_text("Q4_K_M")
    expect(g).to_contain_text("MiB")
    g.locator('button[data-action="load"]').click()
    expect(g.locator(".state")).to_have_text("loaded", timeout=60_000)
    # Pin writes evictable = false for the model (the scheduling work's key).
    g.locator('button[data-action="pin"]').click()
    if "evictable" in ModelConfig.model_fields:
        expect(g.locator(".state .tag")).to_have_text("pinned", timeout=20_000)
        expect(g.locator('button[data-action="unpin"]')).to_be_visible()
    else:
        expect(page.locator("#catalog-error")).to_contain_text("evictable: unknown key")
    shot(page, "models", phone=True)

    page.locator("#tab-keys").click()
    expect(page.locator("#keys-empty")).to_be_visible()
    expect(page.locator("#keys-empty")).to_contain_text("keys")
    shot(page, "keys")
    page.locator("#tab-overview").click()
    shot(page, "overview", phone=True)


def test_dark_scheme_and_security_headers(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(gemma_model(gemma))
    for path in ("/dashboard/", "/dashboard/charts.js", "/dashboard/uplot.min.js"):
        r = httpx.get(c.url + path)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
    page = browser.new_page(color_scheme="dark")
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(c.url + "/dashboard/#charts")
    expect(page.locator("#chart-requests")).to_be_visible(timeout=10_000)
    bg = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(15, 17, 21)"
    shot(page, "charts-dark")
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors
    page.close()


def test_keys_view_and_pull_progress_render_the_documented_shapes(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    """GET /admin/keys belongs to the keys work and a download to the models work: the
    page is held to their documented shapes here, answered by Playwright; a real pull
    of the configured model goes through Corral."""
    c = corral(gemma_model(gemma))
    page = open_dashboard(browser, c)
    keys = {"keys": [{
        "name": "team-a", "models": ["gemma"], "admin": False, "priority": 2,
        "limits": {"max_concurrent": 4, "requests_per_minute": 60, "tokens_per_minute": None},
        "usage": {"in_flight": 1, "requests_total": 42, "tokens_total": 1234,
                  "requests_last_minute": 5, "tokens_last_minute": 99, "rejected_total": 3}}]}
    page.route("**/admin/keys", lambda route: route.fulfill(json=keys))
    page.locator("#tab-keys").click()
    row = page.locator('#keys tr[data-key="team-a"]')
    expect(row).to_contain_text("42")
    expect(row).to_contain_text("1234")
    expect(row).to_contain_text("4 at once, 60 req/min")
    expect(page.locator("#keys-empty")).to_be_hidden()
    shot(page, "keys-listed")

    page.locator("#tab-models").click()
    page.locator("#pull-name").fill("gemma")  # configured: Corral's pull makes sure it loads
    page.locator("#pull-form button").click()
    expect(page.locator("#pull-status")).to_have_text("success", timeout=60_000)
    expect(page.locator('#catalog tr[data-model="gemma"] .state')).to_have_text("loaded")

    steps = [{"status": "pulling manifest"},
             {"status": "pulling abc", "digest": "sha256:abc", "total": 1000, "completed": 0},
             {"status": "pulling abc", "digest": "sha256:abc", "total": 1000, "completed": 600},
             {"status": "verifying sha256 digest"}, {"status": "success"}]
    body = "".join(json.dumps(s) + "\n" for s in steps)
    page.route("**/admin/ollama/api/pull", lambda route: route.fulfill(
        body=body, content_type="application/x-ndjson"))
    page.evaluate("""() => {
        window.pullSeen = [];
        new MutationObserver(() => window.pullSeen.push(
            document.querySelector('#pull-progress').value)).observe(
            document.querySelector('#pull-progress'), {attributes: true});
    }""")
    page.locator("#pull-name").fill("hf.co/someone/model:Q4_K_M")
    page.locator("#pull-form button").click()
    expect(page.locator("#pull-status")).to_have_text("success")
    assert 600 in page.evaluate("() => window.pullSeen")
    assert page.locator("#pull-progress").evaluate("p => p.value === p.max")


def test_config_view_says_why_apply_is_off(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(gemma_model(gemma))  # admin_config_write left off, as by default
    page = open_dashboard(browser, c)
    page.locator("#tab-config").click()
    try:
        expect(page.locator("#cfg-note")).to_contain_text("admin_config_write = true")
        expect(page.locator("#cfg-apply")).to_be_disabled()
        editor = page.locator("#cfg-text")
        expect(editor).not_to_be_empty()
        editor.fill(editor.input_value().replace("ctx_size = 1024", "ctx_size = 2048"))
        expect(page.locator("#cfg-message")).to_contain_text("restarts gemma")  # still checked
    except AssertionError as e:
        shown = {k: page.locator(k).inner_text() for k in ("#cfg-message", "#cfg-errors")}
        raise AssertionError(f"{e}\nthe view shows {shown}, the editor holds "
                             f"{page.locator('#cfg-text').input_value()!r}; "
                             f"Corral's log: {c.log()[-3000:]}") from None
    shot(page, "config-read-only")


def test_views_behind_the_api_key(
    corral: Callable[..., CorralProc], gemma: Path, browser: Browser
) -> None:
    c = corral(gemma_model(gemma), server='api_keys = ["dash-key"]')
    assert httpx.get(c.url + "/admin/timeseries").status_code == 401
    assert httpx.get(c.url + "/admin/catalog").status_code == 401
    page = browser.new_page()
    page.goto(c.url + "/dashboard/#charts")
    expect(page.locator("#key-form")).to_be_visible()
    page.locator("#key-input").fill("dash-key")
    page.locator("#key-input").press("Enter")
    wait_until(lambda: bool(page.evaluate(
        "() => window.corralCharts.last && window.corralCharts.last.t.length")),
        timeout=15, step=0.25)
    page.locator("#tab-models").click()
    expect(page.locator('#catalog tr[data-model="gemma"]')).to_contain_text("Q4_K_M")
    page.close()
