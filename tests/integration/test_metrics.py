"""/metrics, request ids and the scheduler events, through Corral's three ports
against fake llama-servers run as real child processes."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from proxy.edge.reqlog import RequestIdFilter
from proxy.keys import SCHEDULER
from proxy.metrics.registry import METRICS
from tests.conftest import make_config, wait_for


def chat(model: str, stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        **kw,
    }


async def scrape(client: TestClient) -> list[tuple[str, dict[str, str], float]]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    return [
        (s.name, s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        v
        for n, lab, v in samples
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


def series(samples: list[tuple[str, dict[str, str], float]], name: str) -> list[dict[str, str]]:
    return [lab for n, lab, _ in samples if n == name]


async def test_calls_are_counted_by_model_dialect_endpoint_and_status(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "aliases": ["alias"]}]))
    for _ in range(2):
        assert (await ports.openai.post("/v1/chat/completions", json=chat("alias"))).status == 200
    assert (await ports.openai.post("/v1/chat/completions", json=chat("nope"))).status == 404
    assert (await ports.lmstudio.post("/v1/chat/completions", json=chat("m"))).status == 200
    assert (await ports.ollama.get("/api/version")).status == 200
    assert (await ports.openai.get("/v1/nothing/here")).status == 404

    s = await scrape(ports.openai)
    chat_ep = "/v1/chat/completions"
    # The model label is the configured name, not the alias the client sent.
    assert (
        value(
            s, "corral_requests_total", model="m", dialect="openai", endpoint=chat_ep, status="200"
        )
        == 2
    )
    assert value(s, "corral_requests_total", model="alias") == 0
    # An unknown model never becomes a label value.
    assert (
        value(
            s, "corral_requests_total", model="", dialect="openai", endpoint=chat_ep, status="404"
        )
        == 1
    )
    assert (
        value(
            s,
            "corral_requests_total",
            model="m",
            dialect="lmstudio",
            endpoint=chat_ep,
            status="200",
        )
        == 1
    )
    assert (
        value(s, "corral_requests_total", dialect="ollama", endpoint="/api/version", status="200")
        == 1
    )
    # An unmatched path is one bounded value, not the path.
    assert value(s, "corral_requests_total", endpoint="other", status="404") == 1
    assert (
        value(
            s,
            "corral_request_duration_seconds_count",
            model="m",
            dialect="openai",
            endpoint=chat_ep,
        )
        == 2
    )
    assert not any("nope" in json.dumps(lab) or "nothing" in json.dumps(lab) for _, lab, _ in s)
    # No per-child *_created gauges: they would double the series.
    assert not [n for n, _, _ in s if n.endswith("_created")]


async def test_model_path_templates_are_the_endpoint_label(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    assert (await ports.openai.get("/v1/models/m")).status == 200
    assert (await ports.openai.get("/admin/models/m")).status == 200
    s = await scrape(ports.openai)
    assert value(s, "corral_requests_total", endpoint="/v1/models/{model}") == 1
    assert value(s, "corral_requests_total", endpoint="/admin/models/{model}", model="m") == 1


async def test_streams_record_time_to_first_byte(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.05"}}])
    ports = await corral_ports(cfg)
    assert (await ports.openai.post("/v1/chat/completions", json=chat("m"))).status == 200
    resp = await ports.openai.post("/v1/chat/completions", json=chat("m", True, max_tokens=8))
    assert resp.status == 200
    await resp.read()
    s = await scrape(ports.openai)
    labels = {"model": "m", "dialect": "openai", "endpoint": "/v1/chat/completions"}
    # Only the streamed call has a first byte apart from its last.
    assert value(s, "corral_time_to_first_token_seconds_count", **labels) == 1
    ttft = value(s, "corral_time_to_first_token_seconds_sum", **labels)
    assert 0 < ttft < 0.3  # eight tokens 50 ms apart take 0.4 s in all
    assert value(s, "corral_request_duration_seconds_sum", **labels) > ttft + 0.3


_ONE_READ = b"".join(
    b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}).encode()
    + b"\n\n" for t in ("Hel", "lo")) + b"data: [DONE]\n\n"


async def test_a_stream_that_came_in_one_read_goes_out_whole_and_is_timed(
    corral_ports: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    """An upstream stream read whole at once (a short answer; a fast remote) goes to the
    client with its end in one send: still every byte, a 200, and a first byte timed."""
    from aiohttp import web

    async def whole(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=_ONE_READ, content_type="text/event-stream")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", whole)
    app.router.add_get("/v1/models", models)
    remote = await aiohttp_server(app)
    cfg = make_config(tmp_path, [{"name": "r", "remotes": [str(remote.make_url(""))]}])
    ports = await corral_ports(cfg)
    for _ in range(3):
        resp = await ports.openai.post("/v1/chat/completions", json=chat("r", True))
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert await resp.read() == _ONE_READ
    s = await scrape(ports.openai)
    labels = {"model": "r", "dialect": "openai", "endpoint": "/v1/chat/completions",
              "status": "200"}
    assert value(s, "corral_requests_total", **labels) == 3
    labels.pop("status")
    assert value(s, "corral_time_to_first_token_seconds_count", **labels) == 3


async def test_request_ids_are_returned_and_client_ids_kept(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    plain = await ports.openai.post("/v1/chat/completions", json=chat("m"))
    stream = await ports.openai.post("/v1/chat/completions", json=chat("m", True))
    await stream.read()
    error = await ports.openai.post("/v1/chat/completions", json=chat("nope"))
    ollama_404 = await ports.ollama.get("/api/nothing")
    ids = [r.headers.get("X-Request-Id") for r in (plain, stream, error, ollama_404)]
    assert all(ids) and len(set(ids)) == 4, ids

    mine = await ports.openai.get("/v1/models", headers={"X-Request-Id": "trace-abc-123"})
    assert mine.headers["X-Request-Id"] == "trace-abc-123"
    for bad in ("x" * 200, "caf\u00e9"):
        resp = await ports.openai.get("/v1/models", headers={"X-Request-Id": bad})
        assert resp.headers["X-Request-Id"] not in (bad, "")


async def test_log_lines_about_a_call_carry_its_request_id(
    corral_ports: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AT_START": "1"}}])
    ports = await corral_ports(cfg)
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        resp = await ports.openai.post(
            "/v1/chat/completions", json=chat("m"), headers={"X-Request-Id": "req-42"}
        )
    assert resp.status == 503
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    # The launch it caused and the error rendered for it are both tagged.
    assert any("failed to load" in r.getMessage() for r in mine), caplog.text
    assert any(r.name == "proxy.edge.errors" for r in mine)


async def test_llama_server_metrics_are_relabelled_and_tokens_counted(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    completion = prompt = 0
    for n in (3, 5):
        resp = await ports.openai.post("/v1/chat/completions", json=chat("m", max_tokens=n))
        usage = (await resp.json())["usage"]
        completion += usage["completion_tokens"]
        prompt += usage["prompt_tokens"]
    s = await scrape(ports.openai)
    (iid,) = [i.id for i in ports.openai.app[SCHEDULER].instances()]
    assert (
        value(s, "corral_llamacpp_tokens_predicted_total", model="m", instance_id=iid) == completion
    )
    assert value(s, "corral_completion_tokens_total", model="m") == completion
    assert value(s, "corral_prompt_tokens_total", model="m") == prompt
    assert series(s, "corral_llamacpp_requests_processing") == [{"model": "m", "instance_id": iid}]
    # A second scrape adds nothing that was not generated.
    s = await scrape(ports.openai)
    assert value(s, "corral_completion_tokens_total", model="m") == completion


async def test_token_totals_outlive_the_instance(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    resp = await ports.openai.post("/v1/chat/completions", json=chat("m", max_tokens=4))
    assert resp.status == 200
    metrics = ports.openai.app[METRICS]
    # Nobody scrapes: the background poller reads the instance that served a call.
    await wait_for(lambda: metrics.upstream.completion_tokens.get("m") == 4, within=10)
    assert (await ports.openai.post("/admin/models/m/unload")).status == 200
    await wait_for(lambda: not ports.openai.app[SCHEDULER].instances())
    s = await scrape(ports.openai)
    assert value(s, "corral_completion_tokens_total", model="m") == 4
    assert not series(s, "corral_llamacpp_tokens_predicted_total")


async def test_instances_queue_and_scheduler_events(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        [{"name": "a", "parallel": 1, "env": {"FAKE_TOKEN_DELAY": "0.05"}}, {"name": "b"}],
        scheduler={"max_instances": 1},
    )
    ports = await corral_ports(cfg)
    client = ports.openai
    calls = [
        asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("a", max_tokens=6)))
        for _ in range(3)
    ]
    await wait_for(lambda: any(i.in_flight for i in client.app[SCHEDULER].instances()))
    await wait_for(lambda: client.app[SCHEDULER].model_status()[0]["queued"] == 2)
    s = await scrape(client)
    assert value(s, "corral_queue_depth", model="a") == 2
    assert value(s, "corral_instances", model="a", state="ready") == 1
    assert value(s, "corral_instances", model="b", state="ready") == 0
    assert value(s, "corral_instance_in_flight", model="a") == 1
    assert value(s, "corral_instance_slots", model="a") == 1
    assert value(s, "corral_model_state", model="a", state="loaded") == 1
    assert value(s, "corral_model_state", model="b", state="not-loaded") == 1
    for resp in await asyncio.gather(*calls):
        assert resp.status == 200
        resp.release()

    # b needs a's room: a is evicted.
    assert (await client.post("/v1/chat/completions", json=chat("b"))).status == 200
    s = await scrape(client)
    assert value(s, "corral_queue_wait_seconds_count", model="a", outcome="granted") == 3
    assert value(s, "corral_instance_launches_total", model="a", result="ok") == 1
    assert value(s, "corral_instance_launches_total", model="b", result="ok") == 1
    assert value(s, "corral_instance_load_duration_seconds_count", model="b") == 1
    assert value(s, "corral_evictions_total", model="a") == 1
    assert value(s, "corral_instance_stops_total", model="a", reason="evicted") == 1
    assert value(s, "corral_instance_resident_memory_bytes", model="b") > 0
    assert value(s, "process_resident_memory_bytes") > 0
    assert value(s, "corral_config_reload_success") == 1


async def test_crashes_and_failed_launches_are_counted(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        [
            {"name": "c", "env": {"FAKE_EXIT_AFTER": "0.3"}},
            {"name": "f", "env": {"FAKE_CRASH_AT_START": "1"}},
        ],
    )
    ports = await corral_ports(cfg)
    assert (await ports.openai.post("/v1/chat/completions", json=chat("c"))).status == 200
    assert (await ports.openai.post("/v1/chat/completions", json=chat("f"))).status == 503
    metrics = ports.openai.app[METRICS]
    await wait_for(lambda: metrics.crashes.labels("c")._value.get() == 1)
    s = await scrape(ports.openai)
    assert value(s, "corral_instance_crashes_total", model="c") == 1
    assert value(s, "corral_instance_launches_total", model="f", result="failed") == 1
    assert value(s, "corral_model_state", model="f", state="failed") == 1


async def test_a_client_that_hangs_up_on_reading_the_end_is_not_counted_as_gone(
    corral_ports: Any, tmp_path: Path
) -> None:
    # The fake streams a token every 50 ms, writes [DONE], then waits before it ends
    # the stream: a client that closes on reading [DONE] (most do) leaves while Corral
    # waits for that end.
    ports = await corral_ports(make_config(
        tmp_path, [{"name": "m", "env": {"FAKE_TAIL_DELAY": "0.3", "FAKE_TOKEN_DELAY": "0.05"}}]))
    openai_body = json.dumps(chat("m", stream=True, max_tokens=3)).encode()
    ollama_body = json.dumps({"model": "m", "messages": chat("m")["messages"],
                              "options": {"num_predict": 3}}).encode()

    async def hang_up_after(client: TestClient, path: str, body: bytes, marker: bytes) -> None:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), len(body), body))
        seen = b""
        async with asyncio.timeout(10):
            while marker not in seen:
                data = await reader.read(65536)
                assert data, seen
                seen += data
        writer.close()

    chat_ep = "/v1/chat/completions"
    # The whole answer, then the client leaves: counted 200, on both dialects.
    await hang_up_after(ports.openai, chat_ep, openai_body, b"data: [DONE]")
    await hang_up_after(ports.ollama, "/api/chat", ollama_body, b'"done":true')
    # Mid-stream: the client went away, 499.
    await hang_up_after(ports.openai, chat_ep, openai_body, b'"content"')

    async def counted() -> tuple[float, ...]:
        s = await scrape(ports.openai)
        return tuple(value(s, "corral_requests_total", endpoint=ep, status=code)
                     for ep, code in ((chat_ep, "200"), (chat_ep, "499"),
                                      ("/api/chat", "200"), ("/api/chat", "499")))

    # A call is recorded once its handler has ended: up to the fake's tail delay after.
    for _ in range(100):
        if sum(got := await counted()) >= 3:
            break
        await asyncio.sleep(0.05)
    assert got == (1, 1, 1, 0)
