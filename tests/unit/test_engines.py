"""Engines, the pure parts: runtime templates and substitution, remote and provider
tables, the egress applied to a call, provider listings, redaction."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.calls import egress as proxy_egress
from proxy.edge import jsonc
from scheduler.config import secrets
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.engines.egress import Egress
from scheduler.engines.providers import listed_ids, model_configs
from scheduler.engines.remote import build_egress, shown_url
from scheduler.engines.runtime import build_runtime_spec, substitute, variables
from scheduler.engines.settings import ProviderConfig, RemoteConfig, RuntimeConfig
from scheduler.engines.templates import BUILTINS, resolve_runtime
from scheduler.errors import LoadFailed


def cfg(**data: Any) -> CorralConfig:
    return CorralConfig(**data)


# -- runtimes --------------------------------------------------------------------------


def test_substitution_keeps_each_element_whole() -> None:
    values = {"PORT": "8001", "HOST": "127.0.0.1", "MODEL": "org/M 1", "MODEL_PATH": "/m;x"}
    argv = substitute(["srv", "--model=${MODEL}", "${MODEL_PATH}", "${ARGS}", "--port",
                       "${PORT}", "$HOME", "${HOST}:${PORT}"],
                      values, ["--a", "b c", "$(rm -rf /)"])
    assert argv == ["srv", "--model=org/M 1", "/m;x", "--a", "b c", "$(rm -rf /)", "--port",
                    "8001", "$HOME", "127.0.0.1:8001"]


def test_variables_of_a_model(tmp_path: Path) -> None:
    m = ModelConfig(name="m", runtime="vllm", upstream_model="org/M", parallel=3, ctx_size=2048)
    v = variables(m, 9000, None)
    assert v == {"PORT": "9000", "HOST": "127.0.0.1", "MODEL_PATH": "", "MODEL": "org/M",
                 "SLOTS": "3", "CTX_SIZE": "2048", "GPU_LAYERS": "999"}
    m2 = ModelConfig(name="m", path=tmp_path / "a.gguf", n_gpu_layers=20)
    assert variables(m2, 1, tmp_path / "a.gguf")["GPU_LAYERS"] == "20"
    assert variables(m2, 1, tmp_path / "a.gguf")["MODEL"] == "m"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["srv", "${NOPE}"], "unknown placeholder ${NOPE}"),
        (["srv", "--x=${ARGS}"], "${ARGS} must be an element of its own"),
        ([], "non-empty list"),
    ],
)
def test_runtime_command_checked(command: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("$", r"\$").replace("{", r"\{")
                       .replace("}", r"\}")):
        RuntimeConfig(command=tuple(command))


def test_runtime_stop_signal_and_health_shorthand() -> None:
    rt = RuntimeConfig(command=("x",), stop_signal="int", health="tcp")
    assert rt.stop_signal == "SIGINT" and rt.health is not None and rt.health.path == "tcp"
    with pytest.raises(ValidationError, match="signal"):
        RuntimeConfig(command=("x",), stop_signal="KILL")
    with pytest.raises(ValidationError, match="starting with '/'"):
        RuntimeConfig(command=("x",), health="health")


def test_builtin_templates_are_what_the_docs_show() -> None:
    assert BUILTINS["vllm"].command == (
        "vllm", "serve", "${MODEL}", "--host", "${HOST}", "--port", "${PORT}",
        "--served-model-name", "${MODEL}", "--max-num-seqs", "${SLOTS}", "${ARGS}")
    assert BUILTINS["vllm"].api is not None and "messages" not in BUILTINS["vllm"].api
    assert BUILTINS["ollama"].command == ("ollama", "serve")
    assert BUILTINS["ollama"].env["OLLAMA_HOST"] == "${HOST}:${PORT}"
    assert BUILTINS["sglang"].command is not None
    assert BUILTINS["sglang"].command[:3] == ("python3", "-m", "sglang.launch_server")
    whisper = BUILTINS["whisper-server"]
    assert whisper.command is not None and whisper.command[0] == "whisper-server"
    assert whisper.api == ("transcriptions",)
    assert resolve_runtime(None, {}).llama_server


def test_table_overrides_its_template() -> None:
    c = cfg(runtimes={"v2": {"template": "vllm", "binary": "/opt/v/bin/vllm",
                             "env": {"VLLM_X": "1"}, "ready_timeout": 60},
                      "vllm": {"stop_signal": "SIGINT"},
                      "ik": {"binary": "/opt/ik/llama-server"}})
    v2 = resolve_runtime("v2", c.runtimes)
    assert v2.command == BUILTINS["vllm"].command and v2.binary == Path("/opt/v/bin/vllm")
    assert v2.ready_timeout == 60 and v2.env == {"VLLM_X": "1"}
    assert v2.program == "vllm"
    assert resolve_runtime("vllm", c.runtimes).stop_signal is signal.SIGINT
    ik = resolve_runtime("ik", c.runtimes)
    assert ik.llama_server and ik.binary == Path("/opt/ik/llama-server")
    assert ik.program == "llama-server"


def test_command_runtime_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-reach-the-child")
    c = cfg(runtimes={"eng": {"command": ["eng", "${MODEL}", "--port", "${PORT}", "${ARGS}"],
                              "binary": "/opt/eng", "env": {"ENG_HOST": "${HOST}:${PORT}"},
                              "health": {"path": "/ready", "status": 204},
                              "api": ["chat"]}},
            models=[{"name": "m", "runtime": "eng", "upstream_model": "org/m", "args": ["-v"],
                     "env": {"X": "1"}}])
    rt = resolve_runtime("eng", c.runtimes)
    spec = build_runtime_spec(c, c.models[0], rt, None, port=4321)
    assert list(spec.argv) == ["/opt/eng", "org/m", "--port", "4321", "-v"]
    assert spec.env["ENG_HOST"] == "127.0.0.1:4321" and spec.env["X"] == "1"
    assert "OPENAI_API_KEY" not in spec.env
    assert (spec.health_path, spec.health_status) == ("/ready", 204)
    assert spec.upstream_model == "org/m" and spec.apis == frozenset({"chat"})
    assert spec.engine == "eng"


def test_model_path_runtime_without_a_file_fails_clearly() -> None:
    c = cfg(models=[{"name": "w", "runtime": "whisper-server"}])
    rt = resolve_runtime("whisper-server", c.runtimes)
    with pytest.raises(LoadFailed, match=r"needs \$\{MODEL_PATH\}"):
        build_runtime_spec(c, c.models[0], rt, None, port=1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": [{"name": "a", "runtime": "nope"}]}, "no runtime named 'nope'"),
        ({"runtimes": {"ik": {"binary": "/x"}}, "models": [{"name": "a", "runtime": "ik"}]},
         "runs llama-server, which needs 'path'"),
        ({"runtimes": {"x": {"template": "tgi"}}}, "no built-in 'tgi'"),
        ({"providers": [{"name": "p", "url": "http://a"}, {"name": "p", "url": "http://b"}]},
         "names must be unique"),
    ],
)
def test_engine_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        cfg(**data)


def test_runtime_model_needs_no_file() -> None:
    m = ModelConfig(name="v", runtime="vllm")
    assert m.local and not m.has_file


# -- remotes ---------------------------------------------------------------------------


def test_remote_table_and_bare_url() -> None:
    m = ModelConfig(name="r", remotes=("http://h:1/", {"url": "https://api.x.com/v1",
                                                       "api_key": "sk-1", "model": "x-large"}))
    a, b = m.remote_configs()
    assert a.url == "http://h:1" and a.api_key is None and a.health == "auto"
    assert b.api_key is not None and b.api_key.get_secret_value() == "sk-1"
    assert "sk-1" not in repr(m) and "sk-1" not in str(m.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "ftp://x"}, "not an http"),
        ({"url": "https://x/v1?key=abc"}, "no query string"),
        ({"url": "http://x", "api_key": "a", "api_key_env": "B"}, "not both"),
        ({"url": "http://x", "api_key_env": "CORRAL_TEST_UNSET_VAR"}, "is not set"),
        ({"url": "http://x", "api_key_env": "1BAD"}, "not a variable name"),
        ({"url": "http://x", "headers": {"Bad Name": "v"}}, "not a valid header"),
        ({"url": "http://x", "api_key": "k", "headers": {"Authorization": "x"}}, "only one"),
        ({"url": "http://x", "health": "/ping"}, "health"),
    ],
)
def test_remote_table_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RemoteConfig(**table)


def test_egress_of_a_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    rc = RemoteConfig(url="https://generativelanguage.googleapis.com/v1beta/openai",
                      api_key="g-key", headers={"X-Title": "corral"}, tls_verify=False,
                      timeout=30)
    out = build_egress(rc, "g-key", "gemini-2.0-flash")
    assert out.headers == {"X-Title": "corral", "Authorization": "Bearer g-key"}
    assert out.api_base and out.ssl is False and out.first_byte_timeout == 30
    assert out.path("/v1/chat/completions") == "/chat/completions"
    assert out.path("/v1") == ""
    assert out.path("/tokenize") == "/tokenize"
    assert "g-key" not in repr(out)
    plain = build_egress(RemoteConfig(url="http://gpu:8000"), None, None)
    assert not plain.api_base and plain.path("/v1/models") == "/v1/models"


def test_body_renamed_only_where_the_upstream_names_the_model_differently() -> None:
    body = b'{"model":"cloud","messages":[],"x":{"y":1}}'
    assert proxy_egress.renamed_body(body, Egress()) is body  # byte for byte
    out = proxy_egress.renamed_body(body, Egress(rename="gpt-4o"))
    assert out is not None
    assert jsonc.loads(out) == {"model": "gpt-4o", "messages": [], "x": {"y": 1}}
    assert proxy_egress.renamed_payload({"model": "a"}, Egress(rename="b")) == {"model": "b"}
    assert proxy_egress.renamed_body(b"", Egress(rename="b")) == b""


def test_the_slot_is_spliced_into_a_body_without_parsing_it() -> None:
    body = b'  {"model":"m","messages":[]}'
    assert proxy_egress.in_slot(body, None) is body
    assert jsonc.loads(proxy_egress.in_slot(body, 2) or b"") == {
        "id_slot": 2, "model": "m", "messages": []}
    assert proxy_egress.in_slot(b"{ }", 0) == b'{"id_slot":0 }'
    assert proxy_egress.in_slot(b"[1]", 1) == b"[1]"  # not an object: as it came
    assert proxy_egress.payload_in_slot({"model": "m"}, 1) == {"id_slot": 1, "model": "m"}
    assert proxy_egress.payload_in_slot({"model": "m"}, None) == {"model": "m"}


def test_shown_url_drops_credentials() -> None:
    assert shown_url("https://user:pw@host:8/v1") == "https://host:8/v1"
    assert shown_url("http://h:1") == "http://h:1"


# -- providers -------------------------------------------------------------------------


def test_provider_listing_becomes_models() -> None:
    p = ProviderConfig(name="or", url="https://openrouter.ai/api/v1", api_key="sk-or",
                       prefix="or/", models=("a/x", "b y", "c"), slots=4)
    ids = listed_ids({"data": [{"id": "a/x"}, {"id": "b y"}, {"id": "c"}, {"id": "d"},
                               {"nope": 1}]})
    assert ids == ["a/x", "b y", "c", "d"]
    models = model_configs(p, ids)
    # "b y" is no valid model name; "d" is not among the wanted.
    assert [m.name for m in models] == ["or/a/x", "or/c"]
    [rc] = models[0].remote_configs()
    assert rc.model == "a/x" and rc.health == "none" and rc.slots == 4
    assert models[0].origin == "provider:or"  # shown in /v1/models
    assert rc.api_key is not None and rc.api_key.get_secret_value() == "sk-or"
    assert model_configs(p, ids) == models  # equal configs: a refresh restarts nothing
    star = ProviderConfig(name="o", url="http://ollama:11434")
    [m] = model_configs(star, ["llama3.2:1b"])
    assert m.name == "llama3.2:1b" and m.remote_configs()[0].model is None
    with pytest.raises(ValueError, match="not an OpenAI model list"):
        listed_ids({"models": []})


# -- redaction -------------------------------------------------------------------------


def test_config_credentials_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROV_KEY", "prov-secret-1")
    c = cfg(server={"api_keys": ["corral-key"]},
            models=[{"name": "r", "remotes": [{"url": "http://a", "api_key": "remote-secret",
                                               "headers": {"X-Api-Key": "hdr-secret",
                                                           "X-Title": "fine-title"}}]}],
            providers=[{"name": "p", "url": "http://p", "api_key_env": "PROV_KEY"}])
    found = c.credentials()
    assert found == {"corral-key", "remote-secret", "hdr-secret", "prov-secret-1"}
    dumped = secrets.scrub_data(secrets.redact(c.model_dump(mode="json")), found)
    text = str(dumped)
    assert not any(s in text for s in found)
    assert "fine-title" in text and "PROV_KEY" in text


def test_file_secrets_found_anywhere() -> None:
    data = {"server": {"api_keys": ["key-one"]},
            "models": [{"remotes": [{"api_key": "key-two",
                                     "headers": {"Authorization": "Bearer key-three",
                                                 "X-Title": "not-a-secret"}}]}],
            "providers": [{"api_key": "key-four"}]}
    assert secrets.values(data) == {"key-one", "key-two", "Bearer key-three", "key-four"}


# -- corral check / corral models ------------------------------------------------------


def test_check_and_models_name_engines_but_never_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cli import main

    monkeypatch.setenv("CHECK_PROVIDER_KEY", "prov-check-secret")
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        '[runtimes.eng]\ncommand = ["/nonexistent/engine", "--port", "${PORT}"]\n'
        '[[models]]\nname = "e"\nruntime = "eng"\n'
        '[[models]]\nname = "c"\n'
        '[[models.remotes]]\nurl = "https://u:pw@api.x.com/v1"\napi_key = "check-secret-1"\n'
        'ca_file = "/nonexistent/ca.pem"\n'
        '[[providers]]\nname = "p"\nurl = "http://p:1"\napi_key_env = "CHECK_PROVIDER_KEY"\n'
    )
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model 'e': runtime 'eng': /nonexistent/engine is not an executable" in err
    assert "model 'c': remotes: ca_file /nonexistent/ca.pem does not exist" in err
    assert main(["models", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "runtime eng" in out and "remote https://api.x.com/v1" in out
    for secret in ("check-secret-1", "prov-check-secret", "pw@"):
        assert secret not in err + out
    # A missing api_key_env is an error that names the variable, not a value.
    monkeypatch.delenv("CHECK_PROVIDER_KEY")
    with pytest.raises(SystemExit) as stop:
        main(["check", str(cfg)])
    assert stop.value.code == 2
    assert "CHECK_PROVIDER_KEY is not set" in capsys.readouterr().err


def test_builtin_specs_for_ollama_and_whisper(tmp_path: Path) -> None:
    c = cfg(models=[{"name": "llama3", "runtime": "ollama", "upstream_model": "llama3.2:1b",
                     "parallel": 2, "ctx_size": 8192},
                    {"name": "whisper", "runtime": "whisper-server",
                     "path": str(tmp_path / "ggml-base.bin")}])
    ollama = build_runtime_spec(c, c.models[0], resolve_runtime("ollama", c.runtimes), None,
                                port=5000)
    assert list(ollama.argv) == ["ollama", "serve"]
    assert (ollama.env["OLLAMA_HOST"], ollama.env["OLLAMA_NUM_PARALLEL"],
            ollama.env["OLLAMA_CONTEXT_LENGTH"]) == ("127.0.0.1:5000", "2", "8192")
    assert ollama.upstream_model == "llama3.2:1b" and ollama.health_path == "/api/version"
    whisper = build_runtime_spec(c, c.models[1], resolve_runtime("whisper-server", c.runtimes),
                                 tmp_path / "ggml-base.bin", port=5001)
    assert list(whisper.argv) == [
        "whisper-server", "-m", str(tmp_path / "ggml-base.bin"), "--host", "127.0.0.1",
        "--port", "5001", "--inference-path", "/v1/audio/transcriptions"]
    assert whisper.health_path == "tcp" and whisper.upstream_model is None


def test_fallback_may_name_a_provider_model() -> None:
    providers = [{"name": "g", "url": "https://api.groq.com/openai/v1", "api_key": "k",
                  "prefix": "groq/"},
                 {"name": "o", "url": "http://nas:11434", "models": ["llama3.2:1b"]}]
    c = cfg(providers=providers, models=[{"name": "a", "remotes": ["http://h:1"],
                                          "fallbacks": ["groq/llama-3.1-8b", "llama3.2:1b"]}])
    assert c.models[0].fallbacks == ("groq/llama-3.1-8b", "llama3.2:1b")
    with pytest.raises(ValidationError, match="no model named 'mistral'"):
        cfg(providers=providers, models=[
            {"name": "a", "remotes": ["http://h:1"], "fallbacks": ["mistral"]}])


def test_default_apis_of_a_remote() -> None:
    from scheduler.engines.remote import default_apis

    assert default_apis("https://api.openai.com/v1") == {"chat", "completions", "embeddings"}
    assert default_apis("http://gpu:8080") is None  # a llama-server: all it speaks
    assert default_apis("http://cloud:8080", "none") == {"chat", "completions", "embeddings"}
    # Provider models are never probed: the same guess.
    [m] = model_configs(ProviderConfig(name="c", url="http://corral:8080"), ["x"])
    assert m.remote_configs()[0].health == "none"


def test_every_example_in_docs_engines_is_a_valid_config(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import re
    import tomllib

    text = (Path(__file__).resolve().parents[2] / "docs" / "engines.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 10
    for var in set(re.findall(r'api_key_env = "([A-Z_]+)"', text)):
        monkeypatch.setenv(var, "doc-example-key")
    for block in blocks:
        data = tomllib.loads(block)
        try:
            CorralConfig(**data)
        except ValidationError as e:
            raise AssertionError(
                f"docs/engines.md example does not validate:\n{block}\n{e}") from None


def test_log_scrubber_knows_upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("SCRUB_PROV_KEY", "prov-scrub-secret")
    c = cfg(models=[{"name": "r", "remotes": [{"url": "http://a", "api_key": "remote-scrub-1"}]}],
            providers=[{"name": "p", "url": "http://p", "api_key_env": "SCRUB_PROV_KEY"}])
    scrubber = secrets.ScrubFilter(lambda: c)
    for key in ("remote-scrub-1", "prov-scrub-secret"):
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "upstream said %s",
                                   (f"bad key {key}",), None)
        assert scrubber.filter(record)
        assert key not in record.getMessage() and secrets.REDACTED in record.getMessage()


async def test_provider_whose_key_variable_vanished_keeps_its_list(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from scheduler.engines.providers import Providers

    monkeypatch.setenv("VANISHING_KEY", "vanishing-secret")
    p = ProviderConfig(name="v", url="http://v:1", api_key_env="VANISHING_KEY",
                       headers={"X-Api-Key": "header-secret-9"})
    offered: list[list[str]] = []

    class Sched:
        async def set_dynamic_models(self, source: str, models: Any) -> dict[str, list[str]]:
            offered.append([m.name for m in models])
            return {}

        def remotes(self) -> list[Any]:
            return []

    providers = Providers(Sched(), None)  # type: ignore[arg-type]

    async def listing(_: ProviderConfig) -> list[str]:
        return ["a", "b"]

    monkeypatch.setattr(providers, "_list", listing)
    assert await providers.refresh(p)
    monkeypatch.delenv("VANISHING_KEY")
    assert not await providers.refresh(p)
    assert offered == [["a", "b"]]
    assert "VANISHING_KEY is not set" in caplog.text
    assert "header-secret-9" not in caplog.text and "vanishing-secret" not in caplog.text


# -- speech and images (issue 30) -------------------------------------------------------


def test_builtin_specs_for_sd_server_and_kokoro(tmp_path: Path) -> None:
    c = cfg(models=[{"name": "sd", "runtime": "sd-server",
                     "path": str(tmp_path / "sd15.gguf"), "args": ["--steps", "8"]},
                    {"name": "tts", "runtime": "kokoro", "upstream_model": "kokoro",
                     "args": ["--app-dir", "/opt/Kokoro-FastAPI"]}])
    sd = build_runtime_spec(c, c.models[0], resolve_runtime("sd-server", c.runtimes),
                            tmp_path / "sd15.gguf", port=5002)
    assert list(sd.argv) == ["sd-server", "-m", str(tmp_path / "sd15.gguf"), "--listen-ip",
                             "127.0.0.1", "--listen-port", "5002", "--steps", "8"]
    assert sd.health_path == "/" and sd.apis == frozenset({"images", "sdapi"})
    tts = build_runtime_spec(c, c.models[1], resolve_runtime("kokoro", c.runtimes), None,
                             port=5003)
    assert list(tts.argv) == ["uvicorn", "api.src.main:app", "--host", "127.0.0.1",
                              "--port", "5003", "--app-dir", "/opt/Kokoro-FastAPI"]
    assert tts.health_path == "/health" and tts.upstream_model == "kokoro"
    assert tts.apis == frozenset({"speech"})


def test_media_runtimes_serve_their_capability_with_long_job_defaults(tmp_path: Path) -> None:
    from scheduler.models.capabilities import capabilities

    c = cfg(models=[{"name": "sd", "runtime": "sd-server", "path": str(tmp_path / "a.gguf")},
                    {"name": "tts", "runtime": "kokoro"},
                    {"name": "sd2", "runtime": "sd-server", "path": str(tmp_path / "b.gguf"),
                     "first_byte_timeout": 60},
                    {"name": "img", "remotes": ["http://gpu:7860"], "capabilities": ["image"]},
                    {"name": "chat", "path": str(tmp_path / "c.gguf")}])
    sd, tts, sd2, img, chat = c.models
    assert capabilities(sd) == {"image"} and capabilities(tts) == {"speech"}
    # An image is a long call without a byte: its defaults say so; a set key wins.
    assert (sd.first_byte_timeout, sd.stall_timeout) == (1800.0, 600.0)
    assert sd2.first_byte_timeout == 60.0 and img.first_byte_timeout == 1800.0
    # A TTS server has no file to size: a footprint of its own; chat keeps the defaults.
    assert tts.footprint == 1 << 30 and sd.footprint is None
    assert (chat.first_byte_timeout, chat.stall_timeout) == (600.0, 120.0)
    assert "image" not in capabilities(chat)
