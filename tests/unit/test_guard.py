"""Pure parts of the edge guards: Host matching, key decoding, child environment,
keep_alive/ttl ranges (the config keys HTTP may write: test_writable.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from proxy.dialects import lmstudio, translate
from proxy.edge.guard import host_matcher, host_name
from scheduler.config.root import CorralConfig, ServerConfig
from scheduler.errors import BadRequest
from scheduler.process.launcher import child_environ


@pytest.mark.parametrize(("host", "ok"), [
    ("localhost:8080", True), ("LOCALHOST", True), ("app.localhost:1", True),
    ("127.0.0.1:8080", True), ("127.9.9.9", True), ("[::1]:11434", True),
    ("evil.example:8080", False), ("evil.example", False), ("", False),
    ("localhost.evil.example", False), ("10.0.0.5:8080", False), ("[::2]:80", False),
])
def test_loopback_hosts_only_by_default(host: str, ok: bool) -> None:
    assert host_matcher(ServerConfig())(host) is ok


def test_allowed_hosts_patterns_and_bound_host() -> None:
    allowed = host_matcher(
        ServerConfig(host="0.0.0.0", allowed_hosts=("corral.lan", "*.example.com"))
    )
    assert allowed("corral.lan:8080") and allowed("a.example.com") and allowed("localhost")
    assert not allowed("example.com.evil") and not allowed("0.0.0.0") and not allowed("evil")
    assert host_matcher(ServerConfig(host="192.168.1.9"))("192.168.1.9:1234")
    assert host_matcher(ServerConfig(allowed_hosts=("*",)))("anything:1")
    assert host_name("[::1]:80") == "::1" and host_name("A.B:9") == "a.b"


def test_child_environ_drops_corral_and_secret_names() -> None:
    env = child_environ({
        "CORRAL_SERVER__API_KEYS": '["k"]', "corral_x": "1", "FOO_TOKEN": "t",
        "OPENAI_API_KEY": "k", "aws_secret_access_key": "s", "DB_PASSWORD": "p",
        "GCP_CREDENTIALS": "c", "PATH": "/bin", "HOME": "/root", "HF_HOME": "/h",
        "CUDA_VISIBLE_DEVICES": "0", "LD_LIBRARY_PATH": "/lib",
    })
    assert env == {"PATH": "/bin", "HOME": "/root", "HF_HOME": "/h",
                   "CUDA_VISIBLE_DEVICES": "0", "LD_LIBRARY_PATH": "/lib"}


def test_build_spec_env_keeps_what_the_config_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.process.launcher import build_spec

    monkeypatch.setenv("CORRAL_SERVER__API_KEYS", '["k"]')
    monkeypatch.setenv("FOO_TOKEN", "secret")
    cfg = CorralConfig(models=[{"name": "a", "path": str(tmp_path / "a.gguf"),
                                "env": {"HF_TOKEN": "mine"}}])
    spec = build_spec(cfg, cfg.models[0], Path("/bin/true"), tmp_path / "a.gguf", port=1)
    assert "CORRAL_SERVER__API_KEYS" not in spec.env and "FOO_TOKEN" not in spec.env
    assert spec.env["HF_TOKEN"] == "mine" and "PATH" in spec.env


@pytest.mark.parametrize("value", [1e18, "99999999h", math.inf, "1e400", -5, "-1m"])
def test_huge_or_negative_keep_alive_is_forever(value: object) -> None:
    assert translate.keep_alive_seconds(value) == -1.0


def test_nan_keep_alive_and_ttl_are_bad_requests() -> None:
    with pytest.raises(BadRequest):
        translate.keep_alive_seconds(math.nan)
    with pytest.raises(BadRequest):
        lmstudio.ttl_of(math.nan)
    assert lmstudio.ttl_of(1e300) == -1.0
    assert lmstudio.ttl_of(60) == 60.0


def test_rfc3339_never_overflows() -> None:
    assert translate.rfc3339(1e30).startswith("9999-12-31T23:59:59")
    assert translate.rfc3339(math.nan).startswith("9999-12-31")
    assert translate.rfc3339(-1e30).startswith("1970-01-01")


@pytest.mark.parametrize("args", [
    ["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--api-key", "k"], ["-c", "8192"],
    ["--ctx-size=8192"], ["--slot-save-path", "/tmp"], ["--port", "1"],
])
@pytest.mark.parametrize("where", ["model", "llama_server"])
def test_reserved_flags_are_refused_in_any_args(args: list[str], where: str) -> None:
    from scheduler.config.root import CorralConfig

    data: dict[str, object] = {"models": [{"name": "m", "path": "/m.gguf"}]}
    if where == "model":
        data["models"] = [{"name": "m", "path": "/m.gguf", "args": args}]
    else:
        data["llama_server"] = {"args": args}
    with pytest.raises(ValueError, match="is set by Corral"):
        CorralConfig(**data)
