"""Request policy and variants (scheduler/config/policy.py): the pure ``apply``, the
merge of a variant's rules with its model's, the checks a config gets, and which
name's rules a call gets (proxy/calls/policy.py)."""

from __future__ import annotations

import copy
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.calls.call import Call
from proxy.calls.policy import shape_for, shaped
from proxy.edge import jsonc
from scheduler.config.policy import (
    LIMIT_NAMES,
    RequestPolicy,
    Rules,
    Shape,
    Variant,
    apply,
    compile_rules,
)
from scheduler.config.root import CorralConfig, load_config
from scheduler.config.writable import reason, refused_changes
from scheduler.errors import ConfigError

CHAT = "/v1/chat/completions"


def rules(**policy: Any) -> Rules:
    return compile_rules(RequestPolicy(**policy))


# --- apply -----------------------------------------------------------------------------


def test_defaults_fill_only_what_is_absent_overrides_always_win() -> None:
    r = rules(defaults={"temperature": 0.7, "chat_template_kwargs.enable_thinking": False},
              overrides={"top_k": 20})
    body = {"messages": [], "temperature": 1.5, "top_k": 99,
            "chat_template_kwargs": {"other": 1}}
    out = apply(r, body, CHAT)
    assert out["temperature"] == 1.5  # the client's, kept
    assert out["top_k"] == 20
    # A leaf set inside the client's object, the rest of it kept.
    assert out["chat_template_kwargs"] == {"other": 1, "enable_thinking": False}
    assert apply(r, {"messages": []}, CHAT) == {
        "messages": [], "temperature": 0.7, "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": False}}


def test_strip_removes_nested_paths_and_ignores_missing_ones() -> None:
    r = rules(strip=["logit_bias", "chat_template_kwargs.enable_thinking", "a.b.c"])
    out = apply(r, {"logit_bias": {"1": 2}, "chat_template_kwargs": {
        "enable_thinking": True, "keep": 1}, "a": 5}, CHAT)
    assert out == {"chat_template_kwargs": {"keep": 1}, "a": 5}


def test_a_default_is_a_value_even_when_the_client_sent_null() -> None:
    r = rules(defaults={"seed": 1})
    assert apply(r, {"seed": None}, CHAT) == {"seed": None}


def test_clamp_bounds_numbers_and_leaves_other_values() -> None:
    r = rules(clamp={"temperature": {"min": 0.1, "max": 1.0}, "top_k": {"max": 40}})
    assert apply(r, {"temperature": 2, "top_k": 100}, CHAT) == {"temperature": 1.0,
                                                                 "top_k": 40}
    assert apply(r, {"temperature": 0.0}, CHAT) == {"temperature": 0.1}
    assert apply(r, {"temperature": 0.5}, CHAT) == {"temperature": 0.5}
    # Not a number, or absent: the upstream's business.
    assert apply(r, {"temperature": "hot", "top_k": True}, CHAT) == {
        "temperature": "hot", "top_k": True}
    assert apply(r, {}, CHAT) == {}


@pytest.mark.parametrize(("path", "name"), [
    (CHAT, "max_tokens"), ("/v1/messages", "max_tokens"), ("/v1/completions", "max_tokens"),
    ("/v1/responses", "max_output_tokens"), ("/completion", "n_predict"),
    ("/infill", "n_predict")])
def test_the_token_limit_is_one_rule_under_every_name(path: str, name: str) -> None:
    clamp = rules(clamp={"max_tokens": {"max": 5}})
    # Claude Code's 32,000, and each other name a client may use for the same figure.
    for sent in LIMIT_NAMES:
        assert apply(clamp, {sent: 32000}, path) == {sent: 5}
    # Ollama's translation sends both names; llama-server reads n_predict first.
    assert apply(clamp, {"max_tokens": 900, "n_predict": 900}, path) == {
        "max_tokens": 5, "n_predict": 5}
    assert apply(clamp, {"max_tokens": 3}, path) == {"max_tokens": 3}
    # Absent or -1 means unlimited, which a max bounds.
    assert apply(clamp, {}, path) == {name: 5}
    assert apply(clamp, {"n_predict": -1}, path) == {"n_predict": 5}
    # A rule written under another name is the same rule.
    assert apply(rules(clamp={"n_predict": {"max": 7}}), {"max_tokens": 100}, path) == {
        "max_tokens": 7}
    assert apply(rules(defaults={"max_tokens": 9}), {}, path) == {name: 9}
    assert apply(rules(defaults={"max_tokens": 9}), {"n_predict": 2}, path) == {
        "n_predict": 2}
    assert apply(rules(overrides={"max_tokens": 9}), {"n_predict": 2, "max_tokens": 2},
                 path) == {name: 9}
    assert apply(rules(strip=["max_completion_tokens"]), {"max_tokens": 1, "n_predict": 1},
                 path) == {}


def test_clamp_min_on_the_token_limit_raises_a_small_one() -> None:
    r = rules(clamp={"max_tokens": {"min": 16, "max": 64}})
    assert apply(r, {"max_tokens": 1}, CHAT) == {"max_tokens": 16}
    assert apply(rules(clamp={"max_tokens": {"min": 16}}), {}, CHAT) == {}


_KEYS = st.sampled_from(["a", "b", "c", "max_tokens", "n_predict"])
_LEAF = st.one_of(st.integers(-5, 100), st.floats(-5, 100, allow_nan=False), st.text(max_size=3),
                  st.booleans(), st.none())
_BODY = st.recursive(_LEAF, lambda inner: st.dictionaries(_KEYS, inner, max_size=4),
                     max_leaves=12).filter(lambda b: isinstance(b, dict))
_PATH = st.lists(_KEYS, min_size=1, max_size=3).filter(
    lambda p: p[0] not in LIMIT_NAMES or len(p) == 1).map(".".join)


@st.composite
def _policies(draw: st.DrawFn) -> RequestPolicy:
    """Policies that pass the config's checks (disjoint kinds of rule)."""
    paths = draw(st.lists(_PATH, max_size=6, unique=True))
    chosen: list[tuple[str, str]] = []
    for p in paths:
        parts = tuple(p.split("."))
        if any(parts[:len(q)] == q[:len(parts)] for _, o in chosen for q in [tuple(o.split("."))]):
            continue
        chosen.append((draw(st.sampled_from(["strip", "defaults", "overrides", "clamp"])), p))
    kinds: dict[str, Any] = {"strip": [], "defaults": {}, "overrides": {}, "clamp": {}}
    for kind, p in chosen:
        if kind == "strip":
            kinds["strip"].append(p)
        elif kind == "clamp":
            kinds["clamp"][p] = {"min": 0, "max": draw(st.integers(0, 50))}
        else:
            kinds[kind][p] = draw(st.integers(0, 9))
    try:
        return RequestPolicy(**kinds)
    except ValueError:
        return RequestPolicy()


def _get(body: Any, dotted: str) -> Any:
    for seg in dotted.split("."):
        if not isinstance(body, dict) or seg not in body:
            return KeyError
        body = body[seg]
    return body


@settings(max_examples=300, deadline=None)
@given(_BODY, _policies())
def test_apply_keeps_its_promises_and_never_changes_the_body_it_was_given(
        body: dict[str, Any], policy: RequestPolicy) -> None:
    before = copy.deepcopy(body)
    out = apply(compile_rules(policy), body, "/v1/messages")
    assert body == before  # a resend to another upstream reuses it
    limit = set(LIMIT_NAMES)
    for p, value in policy.overrides.items():
        if p in limit:
            assert out["max_tokens"] == value and not limit - {"max_tokens"} & set(out)
        else:
            assert _get(out, p) == value
    for p in policy.strip:
        assert _get(out, p) is KeyError if p not in limit else not limit & set(out)
    for p, value in policy.defaults.items():
        if p not in limit and _get(before, p) is KeyError:
            assert _get(out, p) == value
    for p, b in policy.clamp.items():
        got = [out.get(n) for n in limit] if p in limit else [_get(out, p)]
        for v in got:
            if isinstance(v, int | float) and not isinstance(v, bool):
                assert b.min is not None and b.max is not None and b.min <= v <= b.max
    # The same rules again change nothing more.
    assert apply(compile_rules(policy), out, "/v1/messages") == out


# --- variants over their model ---------------------------------------------------------


def test_a_variant_rule_replaces_the_model_rule_for_its_path() -> None:
    model = RequestPolicy(defaults={"chat_template_kwargs.enable_thinking": False},
                          strip=["temperature"], clamp={"max_tokens": {"max": 100}})
    think = Variant(name="m:think", params={"chat_template_kwargs": {"enable_thinking": True}},
                    request=RequestPolicy(defaults={"temperature": 0.6},
                                          clamp={"max_tokens": {"max": 4000}}))
    r = compile_rules(model, think)
    out = apply(r, {"temperature": 2, "max_tokens": 32000, "chat_template_kwargs": {
        "enable_thinking": False}}, CHAT)
    assert out == {"temperature": 2, "max_tokens": 4000,
                   "chat_template_kwargs": {"enable_thinking": True}}
    assert apply(compile_rules(model), {"temperature": 2, "max_tokens": 32000}, CHAT) == {
        "max_tokens": 100, "chat_template_kwargs": {"enable_thinking": False}}
    # A variant without rules of its own has its model's.
    assert compile_rules(model, Variant(name="m:same")) == compile_rules(model)


def test_the_rules_of_a_call_follow_the_name_asked_and_the_model_serving() -> None:
    cfg = CorralConfig(models=[
        {"name": "a", "path": "/a.gguf", "aliases": ["a2"], "fallbacks": ["b"],
         "variants": [{"name": "a:x", "params": {"x": 1}}]},
        {"name": "b", "path": "/b.gguf", "request": {"overrides": {"y": 2}}},
        {"name": "c", "path": "/c.gguf"}])
    shapes: dict[str, Shape] = {}
    for m in cfg.models:
        if not RequestPolicy.model_validate(m.request).empty:
            shapes[m.name] = Shape(m.name, m.name, compile_rules(m.request))
        for v in m.variants:
            shapes[v.name] = Shape(m.name, v.name, compile_rules(m.request, v))
    assert shape_for(shapes, "a:x", "a") == shapes["a:x"]
    # Served by its fallback: the fallback's rules, counted under the fallback's name.
    assert shape_for(shapes, "a:x", "b") == shapes["b"]
    assert shape_for(shapes, "a", "b") == shapes["b"]
    assert shape_for(shapes, "a2", "a") is None
    assert shape_for(shapes, "c", "c") is None


def test_a_body_is_reshaped_only_where_it_generates() -> None:
    shape = Shape("m", "m", rules(overrides={"temperature": 0}))
    raw = jsonc.dumps({"model": "m", "temperature": 1})
    out = shaped(Call(model="m", path=CHAT, body=raw), shape)
    assert out.body is not None and jsonc.loads(out.body)["temperature"] == 0
    assert shaped(Call(model="m", path="/tokenize", body=raw), shape).body is raw
    assert shaped(Call(model="m", path=CHAT, body=b"not json"), shape).body == b"not json"
    assert shaped(Call(model="m", path=CHAT, body=b"[1]"), shape).body == b"[1]"
    sent = {"temperature": 1}
    assert shaped(Call(model="m", path=CHAT, payload=sent), shape).payload == {
        "temperature": 0}
    assert sent == {"temperature": 1}


# --- the config's checks ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CORRAL_"):
            monkeypatch.delenv(name)


def _problem(tmp_path: Path, text: str) -> str:
    path = tmp_path / "corral.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    lines = exc.value.message.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


MODEL = '[[models]]\nname = "m"\npath = "/m.gguf"\n'


@pytest.mark.parametrize(("text", "message"), [
    ('[models.request]\ndefaults = { "a..b" = 1 }\n',
     "model 'm': request.defaults: Value error, 'a..b' is not a dotted path"),
    ('[models.request]\nstrip = [""]\n', "'' is not a dotted path"),
    ('[models.request]\nstrip = ["n_predict.x"]\n', "n_predict is the token limit, a number"),
    ('[models.request]\nstrip = ["x."]\n', "'x.' is not a dotted path"),
    ('[models.request]\noverrides = { model = "other" }\n',
     "'model': Corral sets the model's name"),
    ('[models.request]\nstrip = ["stream"]\n', "'stream': each dialect decides"),
    ('[models.request]\nstrip = ["chat_template_kwargs"]\n'
     'overrides = { chat_template_kwargs.enable_thinking = true }\n',
     "strip and overrides both name 'chat_template_kwargs': keep one"),
    ('[models.request]\ndefaults = { top_k = 1 }\noverrides = { top_k = 2 }\n',
     "defaults and overrides both name 'top_k'"),
    ('[models.request]\nstrip = ["n_predict"]\ndefaults = { max_tokens = 2 }\n',
     "strip and defaults both name 'max_tokens'"),
    ('[models.request]\noverrides = { top_k = 2 }\nclamp = { top_k = { max = 1 } }\n',
     "overrides and clamp both name 'top_k'"),
    ('[models.request]\nclamp = { max_tokens = { max = 1 }, n_predict = { max = 2 } }\n',
     "clamp names the token limit twice"),
    ('[models.request]\nclamp = { max_tokens = { min = 9, max = 2 } }\n',
     "clamp min (9) exceeds max (2)"),
    ('[models.request]\nclamp = { max_tokens = {} }\n',
     "request.clamp.max_tokens: Value error, a clamp needs 'min', 'max' or both"),
    ('[models.request]\nclamp = { max_tokens = { most = 3 } }\n',
     "request.clamp.max_tokens.most: Input should be a valid dictionary"),
    ('[[models.variants]]\nname = "m"\n', "variant name 'm' is already used by model 'm'"),
    ('[[models.variants]]\nname = "v"\n[[models.variants]]\nname = "w"\naliases = ["v"]\n',
     "variant name 'v' is already used by model 'm'"),
    ('[[models.variants]]\nname = "bad name"\n', "'bad name' is not a valid model name"),
    ('[[models.variants]]\nname = "v"\nparams = { stream = false }\n',
     "'stream': each dialect decides"),
    ('[[models.variants]]\nname = "v"\nparams = { t = 1 }\n[models.variants.request]\n'
     'strip = ["t"]\n', "strip and overrides both name 't'"),
])
def test_bad_policies_are_refused_with_the_model_and_key(tmp_path: Path, text: str,
                                                         message: str) -> None:
    assert message in _problem(tmp_path, MODEL + text)


def test_variant_names_are_unique_across_models_and_not_fallbacks(tmp_path: Path) -> None:
    other = '[[models]]\nname = "o"\npath = "/o.gguf"\n'
    assert "variant name 'o' is already used by model 'o'" in _problem(
        tmp_path, other + MODEL + '[[models.variants]]\nname = "o"\n')
    assert "variant name 'v' is already used by model 'o'" in _problem(
        tmp_path, other + '[[models.variants]]\nname = "v"\n' + MODEL
        + '[[models.variants]]\nname = "v"\n')
    assert "fallbacks: 'v' is a variant of 'm'; name the model" in _problem(
        tmp_path, MODEL + '[[models.variants]]\nname = "v"\n' + other + 'fallbacks = ["v"]\n')


def test_a_nested_table_is_its_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(MODEL + textwrap.dedent("""\
        unlisted = true
        [models.request]
        defaults = { chat_template_kwargs.enable_thinking = false, "a.b" = 1 }
        clamp = { max_tokens = { max = 512 }, options.x = { min = 1 } }
        [[models.variants]]
        name = "m:think"
        aliases = ["m-think"]
        params = { chat_template_kwargs = { enable_thinking = true } }
        unlisted = true
        """))
    m = load_config(path).models[0]
    assert m.unlisted and m.variants[0].unlisted
    assert m.request.defaults == {"chat_template_kwargs.enable_thinking": False, "a.b": 1}
    assert set(m.request.clamp) == {"max_tokens", "options.x"}
    assert m.variants[0].params == {"chat_template_kwargs.enable_thinking": True}
    # Dumped and read again (a worker's copy of the config): the same.
    again = CorralConfig.model_validate(load_config(path).model_dump(mode="json"))
    assert again.models[0] == m


def test_policy_and_variants_may_change_over_http(tmp_path: Path) -> None:
    assert reason(("models", "*", "request", "defaults", "temperature")) is None
    assert reason(("models", "*", "request", "clamp", "max_tokens", "max")) is None
    assert reason(("models", "*", "variants")) is None
    assert reason(("models", "*", "unlisted")) is None
    old = CorralConfig(models=[{"name": "m", "path": "/m.gguf"}])
    new = CorralConfig(models=[{
        "name": "m", "path": "/m.gguf", "unlisted": True,
        "request": {"clamp": {"max_tokens": {"max": 5}}, "strip": ["logit_bias"]},
        "variants": [{"name": "m:fast", "params": {"top_k": 1}}]}])
    assert refused_changes(old, new) == []
