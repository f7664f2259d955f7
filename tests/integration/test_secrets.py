"""No configured secret anywhere it could be read: a whole `corral serve` run at debug
level (good and bad keys, a failed launch, a reload, admin reads, metrics, an error
that echoes a key) is grepped for every secret of its config."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from scheduler.config import secrets
from tests.fakes import fake_binary, free_port, wait_healthy, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-corral-LEAKCHECK-key-1"
OTHER_KEY = "sk-corral-LEAKCHECK-key-2"
TOKEN = "hf_LEAKCHECK_token_3"


def test_redact_and_values_follow_the_naming_rule() -> None:
    data = {"server": {"api_keys": [KEY, OTHER_KEY], "port": 1},
            "keys": [{"name": "team", "key": KEY, "key_sha256": "ab" * 32}],
            "remotes": [{"url": "https://x", "api_key": TOKEN, "api_key_env": "OPENAI_KEY"}],
            "cluster": {"token": "tok-123456"},
            "models": [{"name": "m", "env": {"HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "2"}}]}
    red = secrets.redact(data)
    assert red["server"] == {"api_keys": ["<redacted>"] * 2, "port": 1}
    assert red["keys"][0] == {"name": "team", "key": "<redacted>", "key_sha256": "ab" * 32}
    assert red["remotes"][0]["api_key"] == "<redacted>"
    assert red["remotes"][0]["api_key_env"] == "OPENAI_KEY"  # a variable's name, not a secret
    assert red["cluster"]["token"] == "<redacted>"
    assert red["models"][0]["env"] == {"HF_TOKEN": "<redacted>", "OMP_NUM_THREADS": "2"}
    assert secrets.values(data) == {KEY, OTHER_KEY, TOKEN, "tok-123456"}


def test_scrub_filter_rewrites_records_that_carry_a_secret() -> None:
    cfg = {"server": {"api_keys": [KEY]}}
    f = secrets.ScrubFilter(lambda: cfg)
    rec = logging.LogRecord("x", logging.INFO, "f", 1, "upstream said %s", (f"bad {KEY}",),
                            None)
    assert f.filter(rec) and rec.getMessage() == "upstream said bad <redacted>"
    rec = logging.LogRecord("x", logging.INFO, "f", 1, "plain %d", (3,), None)
    assert f.filter(rec) and rec.getMessage() == "plain 3"


def test_no_secret_in_logs_admin_metrics_or_errors(tmp_path: Path) -> None:
    fake = fake_binary(tmp_path / "bin")
    port = free_port()
    cfg = tmp_path / "corral.toml"
    model = write_dummy_gguf(tmp_path / "m.gguf")
    text = (
        f'[server]\nport = {port}\nollama_enabled = false\nlmstudio_enabled = false\n'
        f'log_level = "debug"\napi_keys = ["{KEY}", "{OTHER_KEY}"]\n'
        f'[llama_server]\nbinary = "{fake}"\n'
        f'[[models]]\nname = "m"\npath = "{model}"\n'
        f'env = {{HF_TOKEN = "{TOKEN}", FAKE_ECHO_ENV = "HF_TOKEN"}}\n'
        f'[[models]]\nname = "broken"\npath = "{model}"\n'
        f'env = {{FAKE_CRASH_AT_START = "1", HF_TOKEN = "{TOKEN}", FAKE_ECHO_ENV = "HF_TOKEN"}}\n'
    )
    cfg.write_text(text)
    log_path = tmp_path / "corral.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config",
                                 str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    seen: list[str] = []
    try:
        wait_healthy(base, proc, log_path)
        with httpx.Client(base_url=base, timeout=30) as http:
            chat = {"model": "m", "messages": [{"role": "user", "content": KEY}]}
            r = http.post("/v1/chat/completions", json=chat, headers=auth)
            assert r.status_code == 200, r.text
            for bad in (KEY + "x", KEY[:-1], OTHER_KEY.upper()):
                r = http.post("/v1/chat/completions", json=chat,
                              headers={"Authorization": f"Bearer {bad}"})
                assert r.status_code == 401
                seen.append(r.text)
            r = http.post("/v1/chat/completions", json={**chat, "model": "broken"},
                          headers=auth)
            assert r.status_code >= 500
            seen.append(r.text)
            for path in ("/admin/config", "/admin/config/file", "/admin/models",
                         "/admin/models/broken", "/admin/instances", "/admin/overview",
                         "/admin/events", "/admin/requests", "/metrics", "/v1/models"):
                r = http.get(path, headers=auth)
                seen.append(f"{path} {r.status_code} {r.text}")
            cfg.write_text(text + "\n# touched\n")
            r = http.post("/admin/config/reload", headers=auth)
            assert r.status_code == 200, r.text
            seen.append(r.text)
            for inst in http.get("/admin/instances", headers=auth).json()["instances"]:
                r = http.get(f"/admin/instances/{inst['id']}/logs", headers=auth)
                seen.append(r.text)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    logged = log_path.read_text(errors="replace")
    assert "launch" in logged.lower() and logged.count("\n") > 10  # it did log, at debug
    for secret in (KEY, OTHER_KEY, TOKEN):
        assert secret not in logged, [ln for ln in logged.splitlines() if secret in ln][:3]
        for out in seen:
            assert secret not in out, out[:500]
    assert "<redacted>" in "".join(seen)
