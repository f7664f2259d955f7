"""Issue 24 through the real llama-server and Gemma 3 270M: prompt caches that follow
real conversations (``timings.cache_n`` of each answer).

* a chat without a system message, swapped away and back, reuses its first turn;
* a new session sharing another's system prompt gets it restored from that session's
  saved slot, and with two replicas is sent to the one that holds it;
* an agent's growing tool transcript reuses each call's predecessor (Anthropic
  Messages, through the real ``anthropic`` client);
* with two slots, each conversation is saved and restored on its own;
* three chats on two slots each get their conversation back at every turn, swap or
  not (a displaced conversation is saved, and restored into whichever slot it gets).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import CorralProc, Tidy, model_toml, wait_until

pytestmark = pytest.mark.e2e

# About 700 tokens each: long enough that re-processing shows, short enough for 2 cores.
SYSTEM = " ".join(f"Rule {i}: file {i} belongs in folder {i * 7 % 13}." for i in range(60))
FIRST = " ".join(f"Fact {i}: the river number {i} flows into lake {i * 5 % 11}."
                 for i in range(55))
SECOND = " ".join(f"Note {i}: the mountain number {i} stands in range {i * 3 % 7}."
                  for i in range(55))
THIRD = " ".join(f"Item {i}: the forest number {i} lies in county {i * 4 % 9}."
                 for i in range(55))


def chat(cp: CorralProc, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    resp = httpx.post(cp.url + "/v1/chat/completions", timeout=180, json={
        "model": model, "messages": messages, "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def said(answer: dict[str, Any]) -> dict[str, str]:
    return {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}


def loaded(cp: CorralProc) -> list[str]:
    models = httpx.get(cp.url + "/admin/models", timeout=10).json()["models"]
    return [m["name"] for m in models if m["state"] == "loaded"]


def ready(cp: CorralProc) -> int:
    insts = httpx.get(cp.url + "/admin/instances", timeout=10).json()["instances"]
    return sum(i["state"] == "ready" for i in insts)


def swap_to_b(cp: CorralProc, slots: Path) -> None:
    chat(cp, "b", [user("hi")])  # a is evicted: its slots are saved
    wait_until(lambda: loaded(cp) == ["b"], timeout=60)
    assert list(slots.glob("*/*.bin")), cp.log()


def two_models(corral: Callable[..., CorralProc], gemma: Path, slots: Path,
               **keys: object) -> CorralProc:
    models = (model_toml("a", gemma, chat_template="gemma3", ctx_size=4096, **keys)
              + model_toml("b", gemma, chat_template="gemma3", ctx_size=4096))
    return corral(models, scheduler=f'max_instances = 1\nslot_cache_dir = "{slots}"')


def test_a_system_less_chat_and_a_shared_system_prompt_survive_a_swap(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    cp = two_models(corral, gemma, tmp_path / "s")
    first = chat(cp, "a", [user(FIRST)])
    prompt = first["usage"]["prompt_tokens"]
    assert prompt > 500
    swap_to_b(cp, tmp_path / "s")
    # The case: [user] then [user, assistant, user], no system message.
    follow = chat(cp, "a", [user(FIRST), said(first), user("And river 6?")])
    assert follow["timings"]["cache_n"] >= prompt - 10, (follow["timings"], cp.log())

    # Another session with a system prompt, saved; a new session sharing that system
    # prompt, on a fresh instance, gets it restored from the other's slot.
    agent = chat(cp, "a", [system(SYSTEM), user("Where does file 3 go?")])
    swap_to_b(cp, tmp_path / "s")
    other = chat(cp, "a", [system(SYSTEM), user("Where does file 9 go?")])
    shared = agent["usage"]["prompt_tokens"] - 20  # the system prompt, about
    assert other["timings"]["cache_n"] >= shared, (other["timings"], cp.log())
    assert "restored" in cp.log()


def test_with_two_slots_each_conversation_is_restored_on_its_own(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    cp = two_models(corral, gemma, tmp_path / "s", parallel=2)
    one = chat(cp, "a", [user(FIRST)])
    two = chat(cp, "a", [user(SECOND)])
    swap_to_b(cp, tmp_path / "s")
    assert len(list((tmp_path / "s").glob("*/*.bin"))) == 2
    # Second conversation first: each finds its own saved slot, whatever the order.
    again2 = chat(cp, "a", [user(SECOND), said(two), user("And mountain 6?")])
    again1 = chat(cp, "a", [user(FIRST), said(one), user("And river 6?")])
    assert again2["timings"]["cache_n"] >= two["usage"]["prompt_tokens"] - 10, cp.log()
    assert again1["timings"]["cache_n"] >= one["usage"]["prompt_tokens"] - 10, cp.log()


def test_two_replicas_send_each_call_where_its_prefix_is(
    corral: Callable[..., CorralProc], gemma: Path
) -> None:
    cp = corral(model_toml("a", gemma, chat_template="gemma3", ctx_size=4096,
                           replicas={"min": 2, "max": 2}))
    wait_until(lambda: ready(cp) == 2, timeout=60)
    # Sessions sharing a system prompt: after the first, each first call goes to the
    # replica that has the system prompt and reuses it.
    sessions = [chat(cp, "a", [system(SYSTEM), user(f"Where does file {n} go?")])
                for n in (1, 2, 3)]
    shared = sessions[0]["usage"]["prompt_tokens"] - 20
    for s in sessions[1:]:
        assert s["timings"]["cache_n"] >= shared, (s["timings"], cp.log())
    # A chat without a system message: its follow-up goes where its first turn went.
    first = chat(cp, "a", [user(FIRST)])
    follow = chat(cp, "a", [user(FIRST), said(first), user("And river 6?")])
    assert follow["timings"]["cache_n"] >= first["usage"]["prompt_tokens"] - 10


def test_an_agents_growing_tool_transcript_reuses_each_step(
    corral: Callable[..., CorralProc], gemma: Path, tidy: Tidy
) -> None:
    cp = corral(model_toml("a", gemma, chat_template="gemma3", ctx_size=4096,
                           replicas={"min": 2, "max": 2}))
    wait_until(lambda: ready(cp) == 2, timeout=60)
    client = tidy(anthropic.Anthropic(base_url=cp.url, api_key="none", max_retries=0,
                                      timeout=180))
    tools: list[Any] = [{"name": "read_file", "description": "Read a file.",
                         "input_schema": {"type": "object",
                                          "properties": {"path": {"type": "string"}}}}]
    messages: list[Any] = [{"role": "user", "content": "Sort the files by the rules."}]
    before = 0
    for step in range(3):
        answer = client.messages.create(model="a", system=SYSTEM, tools=tools,
                                        messages=messages, max_tokens=4)
        raw = answer.model_dump()
        prompt = raw["usage"]["input_tokens"] + raw["usage"].get(
            "cache_read_input_tokens", 0)
        if step:
            # Everything the previous call sent came from the cache.
            assert raw["usage"].get("cache_read_input_tokens", 0) >= before - 10, (
                raw["usage"], cp.log())
        before = prompt
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{step}",
                                               "name": "read_file",
                                               "input": {"path": f"file{step}"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{step}",
                                          "content": FIRST[:400 * (step + 1)]}]},
        ]


def test_a_raw_prompt_that_grows_gets_its_blocks_back_after_a_swap(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    # /v1/completions (and Ollama's /api/generate): a chain of 1 KiB blocks.
    cp = two_models(corral, gemma, tmp_path / "s")

    def complete(prompt: str) -> dict[str, Any]:
        resp = httpx.post(cp.url + "/v1/completions", timeout=180, json={
            "model": "a", "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()
        return out

    first = complete(FIRST)
    swap_to_b(cp, tmp_path / "s")
    grown = complete(FIRST + " " + SECOND)
    assert grown["timings"]["cache_n"] >= first["usage"]["prompt_tokens"] - 10, cp.log()


def test_three_chats_on_two_slots_each_get_their_conversation_back(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    """The workload benchmark's chats: every call displaces another chat's whole
    conversation (no system prompt shared), and a swap comes between turns 1 and 2."""
    cp = two_models(corral, gemma, tmp_path / "s", parallel=2)
    history = [[user(doc)] for doc in (FIRST, SECOND, THIRD)]
    prompts = [0] * len(history)  # each chat's last prompt, in tokens
    for n in range(4):
        if n == 2:
            swap_to_b(cp, tmp_path / "s")
        for k, messages in enumerate(history):
            answer = chat(cp, "a", messages)
            if n:
                assert answer["timings"]["cache_n"] >= prompts[k] - 10, (
                    n, k, answer["timings"], cp.log())
            prompts[k] = answer["usage"]["prompt_tokens"]
            messages += [said(answer), user(f"And number {n + 6}?")]
