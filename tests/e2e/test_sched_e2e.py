"""Issue 13 through the real llama-server and Gemma 3 270M: a long conversation's slot
saved when its model is swapped out and restored when it comes back (the follow-up's
``timings.cache_n``), and ``[[keys]]`` seen through the real ``openai`` and
``anthropic`` clients (scopes in listings and calls, a rate-limited key's 429)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, Tidy, model_toml, wait_until

pytestmark = pytest.mark.e2e

# About 1,500 tokens of Gemma's vocabulary: long enough that re-processing shows.
LONG = " ".join(f"Fact {i}: the river number {i} flows into lake {i * 7 % 13}."
                for i in range(110))


def conversation(*turns: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": turns[0]}]
    for text in turns[1:]:
        messages += [{"role": "assistant", "content": "I see."},
                     {"role": "user", "content": text}]
    return messages


def chat(cp: CorralProc, model: str, messages: list[dict[str, str]]) -> dict[str, object]:
    resp = httpx.post(cp.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    out: dict[str, object] = resp.json()
    return out


def loaded(cp: CorralProc) -> list[str]:
    models = httpx.get(cp.url + "/admin/models", timeout=10).json()["models"]
    return [m["name"] for m in models if m["state"] == "loaded"]


def test_swap_away_and_back_restores_the_conversation(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    models = (model_toml("a", gemma, chat_template="gemma3", ctx_size=4096)
              + model_toml("b", gemma, chat_template="gemma3", ctx_size=4096))
    cp = corral(models, scheduler=f'max_instances = 1\nslot_cache_dir = "{tmp_path / "s"}"')
    first = chat(cp, "a", conversation("Which lake does river 5 flow into?"))
    prompt = first["usage"]["prompt_tokens"]  # type: ignore[index]
    assert prompt > 1200

    chat(cp, "b", [{"role": "user", "content": "hi"}])  # a is evicted: its slot is saved
    wait_until(lambda: loaded(cp) == ["b"], timeout=60)
    assert list((tmp_path / "s").glob("*/*.bin")), cp.log()

    follow = chat(cp, "a", conversation("Which lake does river 5 flow into?",
                                        "And river 6?"))
    timings = follow["timings"]
    # The conversation's prefix came back from disk instead of being re-processed.
    assert timings["cache_n"] >= prompt - 10, (timings, cp.log())  # type: ignore[index]
    assert "restored" in cp.log()


ALICE, BOB, LIMITED = "sk-alice-0123", "sk-bob-4567", "sk-limited-89"


def test_keys_through_the_openai_and_anthropic_clients(
    corral: Callable[..., CorralProc], gemma: Path, tidy: Tidy
) -> None:
    keys = (
        f'[[keys]]\nname = "alice"\nkey = "{ALICE}"\nmodels = ["small"]\n'
        f'[[keys]]\nname = "bob"\nkey = "{BOB}"\nadmin = true\n'
        f'[[keys]]\nname = "limited"\nkey = "{LIMITED}"\nrequests_per_minute = 1\n'
    )
    models = (model_toml("small", gemma, chat_template="gemma3")
              + model_toml("other", gemma, chat_template="gemma3") + keys)
    cp = corral(models, scheduler="max_instances = 2")

    alice = tidy(openai.OpenAI(base_url=cp.url + "/v1", api_key=ALICE, max_retries=0))
    bob = tidy(openai.OpenAI(base_url=cp.url + "/v1", api_key=BOB, max_retries=0))
    assert {m.id for m in alice.models.list()} == {"small"}
    assert {m.id for m in bob.models.list()} == {"small", "other"}
    hello = [{"role": "user", "content": "Hello"}]
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="other", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    out = alice.chat.completions.create(model="small", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    assert out.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        tidy(openai.OpenAI(base_url=cp.url + "/v1", api_key="wrong", max_retries=0)).models.list()

    # Anthropic's client sends its key as x-api-key.
    a_alice = tidy(anthropic.Anthropic(base_url=cp.url, api_key=ALICE, max_retries=0))
    with pytest.raises(anthropic.NotFoundError):
        a_alice.messages.create(model="other", max_tokens=2, messages=hello)  # type: ignore[arg-type]
    msg = a_alice.messages.create(model="small", max_tokens=2, messages=hello)  # type: ignore[arg-type]
    assert msg.type == "message"

    limited = tidy(openai.OpenAI(base_url=cp.url + "/v1", api_key=LIMITED, max_retries=0))
    limited.chat.completions.create(model="small", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as e:
        limited.chat.completions.create(model="small", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    assert 1 <= int(e.value.response.headers["Retry-After"]) <= 60
    a_limited = tidy(anthropic.Anthropic(base_url=cp.url, api_key=LIMITED, max_retries=0))
    with pytest.raises(anthropic.RateLimitError):
        a_limited.messages.create(model="small", max_tokens=2, messages=hello)  # type: ignore[arg-type]

    # Usage per key, for the operator (admin keys only).
    assert httpx.get(cp.url + "/admin/keys", headers={"Authorization": f"Bearer {ALICE}"},
                     timeout=10).status_code == 403
    keys_view = httpx.get(cp.url + "/admin/keys", headers={"Authorization": f"Bearer {BOB}"},
                          timeout=10).json()["keys"]
    usage = {k["name"]: k["usage"] for k in keys_view}
    assert usage["alice"]["requests_total"] == 2 and usage["alice"]["tokens_total"] > 0
    assert usage["limited"]["rejected_total"] == 2


def test_a_flood_from_one_key_leaves_anothers_latency_near_its_own(
    corral: Callable[..., CorralProc], gemma: Path
) -> None:
    import concurrent.futures
    import time

    keys = (f'[[keys]]\nname = "flood"\nkey = "{ALICE}"\n'
            f'[[keys]]\nname = "calm"\nkey = "{BOB}"\n')
    cp = corral(model_toml("g", gemma, chat_template="gemma3", parallel=1) + keys)
    body = {"model": "g", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to twenty."}]}

    def call(key: str) -> float:
        start = time.monotonic()
        resp = httpx.post(cp.url + "/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        return time.monotonic() - start

    call(BOB)  # loads the model
    alone = min(call(BOB) for _ in range(2))
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        flood = [pool.submit(call, ALICE) for _ in range(8)]
        time.sleep(alone)  # the flood is queued
        calm = call(BOB)
        flood_times = [f.result() for f in flood]
    # FIFO would put the calm call behind the whole flood (about 8 calls); the fair
    # queue puts it behind the running call and at most one more.
    assert calm < 4 * alone + 0.5, (calm, alone, sorted(flood_times))
    assert max(flood_times) > 6 * alone, (alone, sorted(flood_times))
