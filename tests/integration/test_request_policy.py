"""Request policy and variants against fake llama-servers: one ``max_tokens`` clamp and
one thinking variant hold for calls from every family and port, as the upstream
received them (/fake/requests); two variants share one instance; ``unlisted`` names
are callable and in no listing; calls are counted under the variant's name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import lmstudio as lms
import pytest

from proxy.keys import SCHEDULER
from scheduler.errors import UnknownModel
from scheduler.ipc import wire as ipc_wire
from scheduler.ipc.worker import WorkerScheduler
from scheduler.keys import tenants
from scheduler.process.instance import State
from scheduler.scheduling.scheduler import Scheduler
from tests.conftest import make_config

CLAMP = {"clamp": {"max_tokens": {"max": 5}}}
THINK = {"chat_template_kwargs.enable_thinking": True}
MODELS = [
    {"name": "small", "parallel": 4, "request": CLAMP, "variants": [
        {"name": "small:think", "params": THINK},
        {"name": "small:fast", "aliases": ["small-fast"], "unlisted": True,
         "params": {"chat_template_kwargs": {"enable_thinking": False}}}]},
    # A chat-only upstream: Messages and Responses reach it translated to chat.
    {"name": "chatty", "api": ["chat"], "env": {"FAKE_REFUSE": "messages,responses"},
     "request": CLAMP, "variants": [{"name": "chatty:think", "params": THINK}]},
    {"name": "hidden", "unlisted": True},
]


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    return await corral_ports(make_config(tmp_path, MODELS))


async def received(ports: Any, model: str) -> list[dict[str, Any]]:
    """What the fake instances serving ``model`` received, oldest first."""
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        for inst in ports.openai.app[SCHEDULER].loaded(model):
            async with s.get(inst.base_url + "/fake/requests") as r:
                # Calls only: not the slot cache's own saves and restores.
                out += [x for x in await r.json() if x["method"] == "POST"
                        and not x["path"].startswith("/slots")]
    return out


def _limits(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens",
                                 "n_predict") if k in body}


async def _every_family(ports: Any, model: str) -> list[str]:
    """One call from each family and port for ``model``, each asking for 200 tokens;
    the paths called, in order."""
    ask = [{"role": "user", "content": "a b c"}]
    calls: list[tuple[Any, str, dict[str, Any]]] = [
        (ports.openai, "/v1/chat/completions", {"model": model, "messages": ask,
                                                "max_tokens": 200}),
        (ports.openai, "/v1/chat/completions", {"model": model, "messages": ask,
                                                "max_completion_tokens": 200,
                                                "stream": True}),
        (ports.openai, "/v1/messages", {"model": model, "messages": ask, "max_tokens": 200}),
        # Not kept (store false): the pass-through, in Responses' own shape.
        (ports.openai, "/v1/responses", {"model": model, "input": "a b c",
                                         "max_output_tokens": 200, "store": False}),
        (ports.ollama, "/api/chat", {"model": model, "messages": ask, "stream": False,
                                     "options": {"num_predict": 200}}),
        (ports.ollama, "/api/generate", {"model": model, "prompt": "a b c", "stream": False,
                                         "options": {"num_predict": 200}}),
        (ports.lmstudio, "/api/v0/chat/completions", {"model": model, "messages": ask,
                                                      "max_tokens": 200}),
        (ports.lmstudio, "/api/v1/chat", {"model": model, "input": "a b c",
                                          "max_output_tokens": 200}),
    ]
    for client, path, body in calls:
        r = await client.post(path, json=body)
        assert r.status == 200, (path, await r.text())
        if path == "/api/chat":
            # Ollama's answer counts what the clamp let through: 5 tokens, not 200.
            assert (await r.json())["eval_count"] == 5
        await r.release()
    return [path for _, path, _ in calls]


async def test_a_clamp_and_a_variant_hold_for_every_family_and_port(ports: Any) -> None:
    await _every_family(ports, "small:think")
    sent = await received(ports, "small")
    assert len(sent) == 8, [s["path"] for s in sent]
    for call in sent:
        body = call["body"]
        # What the upstream received: every name of the limit it got is at most 5.
        limits = _limits(body)
        assert limits and all(v == 5 for v in limits.values()), (call["path"], limits)
        assert body["chat_template_kwargs"]["enable_thinking"] is True, call["path"]
    # Pass-through families kept their own shape: the rule followed their field names.
    by_path = {c["path"]: c["body"] for c in sent}
    assert _limits(by_path["/v1/responses"]) == {"max_output_tokens": 5}
    assert _limits(by_path["/v1/messages"]) == {"max_tokens": 5}


@pytest.mark.timeout(60)
async def test_the_lmstudio_sdk_socket_gets_the_same_rules(ports: Any) -> None:
    async with lms.AsyncClient(f"127.0.0.1:{ports.lmstudio.server.port}") as client:
        model = await client.llm.model("small:think")
        result = await model.respond("x y", config={"maxTokens": 200})
        assert result.stats.predicted_tokens_count == 5
        await model.complete("once upon", config={"maxTokens": 200})
    sent = await received(ports, "small")
    assert [c["path"] for c in sent] == ["/v1/chat/completions", "/v1/completions"]
    for call in sent:
        assert _limits(call["body"]) == {"max_tokens": 5}
        assert call["body"]["chat_template_kwargs"] == {"enable_thinking": True}


async def test_the_same_rules_reach_a_translated_call(ports: Any) -> None:
    await _every_family(ports, "chatty:think")
    sent = await received(ports, "chatty")
    # Messages and Responses arrived as chat completions, shaped after translation.
    assert {c["path"] for c in sent} <= {"/v1/chat/completions", "/v1/completions",
                                         "/completion"}
    assert len(sent) == 8
    for call in sent:
        assert all(v == 5 for v in _limits(call["body"]).values()), call
        assert _limits(call["body"])
        assert call["body"]["chat_template_kwargs"] == {"enable_thinking": True}


async def test_the_model_itself_gets_its_policy_without_the_variants_params(
        ports: Any) -> None:
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "small", "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 100, "chat_template_kwargs": {"enable_thinking": True}})
    assert (await r.json())["usage"]["completion_tokens"] == 5
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "small-fast", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 200
    first, second = [c["body"] for c in await received(ports, "small")]
    assert first["chat_template_kwargs"] == {"enable_thinking": True}  # the client's
    assert first["max_tokens"] == 5
    # An absent limit is unlimited: the clamp sets it; the variant's params apply.
    assert second["max_tokens"] == 5
    assert second["chat_template_kwargs"] == {"enable_thinking": False}


async def test_two_variants_are_served_by_one_instance(ports: Any) -> None:
    for model in ("small:think", "small:fast", "small", "small-fast", "small:think"):
        r = await ports.openai.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status == 200, await r.text()
        assert r.headers["X-Corral-Model"] == "small"
    scheduler = ports.openai.app[SCHEDULER]
    assert len(scheduler.loaded("small")) == 1
    assert len(scheduler.loaded("small:think")) == 1  # the same instance, by its name
    metrics = await (await ports.openai.get("/metrics")).text()
    launches = [line for line in metrics.splitlines()
                if line.startswith("corral_instance_launches_total{")]
    assert 'corral_instance_launches_total{model="small",result="ok"} 1.0' in launches
    assert not any("small:" in line for line in launches), launches
    # Each variant's calls counted under its own name; an alias under its variant's.
    requests = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("corral_requests_total{")
                and 'endpoint="/v1/chat/completions"' in line}
    counted = {k.split('model="')[1].split('"')[0]: v for k, v in requests.items()}
    assert counted == {"small:think": 2.0, "small:fast": 2.0, "small": 1.0}


async def test_unlisted_names_are_callable_and_in_no_listing(ports: Any) -> None:
    lists = {
        "/v1/models": [m["id"] for m in (await (await ports.openai.get("/v1/models")).json())[
            "data"]],
        "/api/tags": [m["name"] for m in (await (await ports.ollama.get("/api/tags")).json())[
            "models"]],
        "/api/v0/models": [m["id"] for m in (await (await ports.lmstudio.get(
            "/api/v0/models")).json())["data"]],
        "/api/v1/models": [m["key"] for m in (await (await ports.lmstudio.get(
            "/api/v1/models")).json())["models"]],
        "/v1/models (LM Studio)": [m["id"] for m in (await (await ports.lmstudio.get(
            "/v1/models")).json())["data"]],
    }
    for where, names in lists.items():
        bare = {n.removesuffix(":latest") for n in names}
        assert {"small", "small:think", "chatty", "chatty:think"} <= bare, (where, names)
        assert not bare & {"hidden", "small:fast", "small-fast"}, (where, names)
    for client, path, body in (
            (ports.openai, "/v1/chat/completions", {"model": "hidden", "messages": [
                {"role": "user", "content": "x"}]}),
            (ports.ollama, "/api/chat", {"model": "small:fast", "stream": False,
                                         "messages": [{"role": "user", "content": "x"}]}),
            (ports.lmstudio, "/api/v0/chat/completions", {"model": "small-fast", "messages": [
                {"role": "user", "content": "x"}]})):
        r = await client.post(path, json=body)
        assert r.status == 200, (path, await r.text())
    # Loaded now, and still not in Ollama's list of running models.
    running = [m["name"] for m in (await (await ports.ollama.get("/api/ps")).json())["models"]]
    assert running == ["small:latest"]
    # An unknown name's error lists no unlisted one.
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 404
    message = json.dumps(await r.json())
    assert "small:think" in message and "hidden" not in message and "small:fast" not in message


async def test_admin_models_shows_policy_variants_and_unlisted(ports: Any) -> None:
    models = {m["name"]: m for m in (await (await ports.openai.get("/admin/models")).json())[
        "models"]}
    small = models["small"]
    assert small["request"] == {"clamp": {"max_tokens": {"max": 5}}}
    assert small["unlisted"] is False and models["hidden"]["unlisted"] is True
    assert small["variants"] == [
        {"name": "small:think", "params": {"chat_template_kwargs.enable_thinking": True}},
        {"name": "small:fast", "aliases": ["small-fast"], "unlisted": True,
         "params": {"chat_template_kwargs.enable_thinking": False}}]
    assert models["hidden"]["request"] == {} and models["hidden"]["variants"] == []


async def test_names_scopes_and_shapes_in_the_owner_and_a_worker(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, MODELS, keys=[
        {"name": "thinker", "key": "sk-thinker-0001", "models": ["small:think"]},
        {"name": "smallish", "key": "sk-smallish-001", "models": ["small"]}])
    async with aiohttp.ClientSession() as session:
        owner = Scheduler(cfg, session)
        # A worker gets the owner's config over its socket, pickled; it resolves names
        # and shapes calls itself.
        copy = ipc_wire.config_of(ipc_wire.config_frame(cfg))
        worker = WorkerScheduler(copy, session, line=None)  # type: ignore[arg-type]
        for sched in (owner, worker):
            assert sched.names() == ["small", "small:think", "chatty", "chatty:think"]
            assert all(sched.knows(n) for n in ("hidden", "small:fast", "small-fast"))
            assert sched.resolve("small-fast").name == "small"
            assert set(sched.shapes) == {"small", "small:think", "small:fast", "small-fast",
                                         "chatty", "chatty:think"}
            assert sched.shapes["small-fast"].label == "small:fast"
            token = tenants.CURRENT.set(sched.tenants.lookup(b"sk-thinker-0001"))
            try:
                assert sched.names() == ["small:think"]
                assert sched.resolve("small:think").name == "small"
                with pytest.raises(UnknownModel):
                    sched.resolve("small")
            finally:
                tenants.CURRENT.reset(token)
            token = tenants.CURRENT.set(sched.tenants.lookup(b"sk-smallish-001"))
            try:
                # A scope naming the model covers its variants, listed ones shown.
                assert sched.names() == ["small", "small:think"]
                assert sched.resolve("small-fast").name == "small"
            finally:
                tenants.CURRENT.reset(token)
        await owner.close()


async def test_the_context_check_counts_the_clamped_limit(corral_ports: Any,
                                                          tmp_path: Path) -> None:
    """prompt + max_tokens over the context is refused in OpenAI's families: what is
    counted is the limit the upstream will receive, not the one the client asked."""
    cfg = make_config(tmp_path, [
        {"name": "tiny", "ctx_size": 512, "request": CLAMP},
        {"name": "plain", "ctx_size": 512}])
    ports = await corral_ports(cfg)
    ask = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 100_000}
    r = await ports.openai.post("/v1/chat/completions", json={"model": "plain", **ask})
    assert r.status == 400, await r.text()  # the check works: no clamp, too long
    r = await ports.openai.post("/v1/chat/completions", json={"model": "tiny", **ask})
    assert r.status == 200, await r.text()
    assert (await r.json())["usage"]["completion_tokens"] == 5


async def test_a_reload_of_policy_alone_restarts_nothing(corral_ports: Any,
                                                         tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m", "request": CLAMP}]))
    scheduler = ports.openai.app[SCHEDULER]
    ask = {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 100}
    assert (await ports.openai.post("/v1/chat/completions", json={"model": "m", **ask})
            ).status == 200
    [before] = scheduler.loaded("m")
    new = make_config(tmp_path, [{"name": "m", "unlisted": True,
                                  "request": {"clamp": {"max_tokens": {"max": 3}}},
                                  "variants": [{"name": "m:v", "params": {"seed": 7}}]}])
    report = await scheduler.apply_config(new)
    assert report["changed"] == ["m"]
    r = await ports.openai.post("/v1/chat/completions", json={"model": "m:v", **ask})
    assert r.status == 200, await r.text()
    assert (await r.json())["usage"]["completion_tokens"] == 3
    assert scheduler.loaded("m") == [before]  # the same instance, never restarted
    assert scheduler.names() == ["m:v"]
    bodies = [c["body"] for c in await received(ports, "m")]
    assert [(b["max_tokens"], b.get("seed")) for b in bodies] == [(5, None), (3, 7)]
    # Any other key still restarts the model.
    other = make_config(tmp_path, [{"name": "m", "parallel": 2}])
    assert (await scheduler.apply_config(other))["changed"] == ["m"]
    assert before.state is not State.READY  # draining, then stopped
