"""Config writes over HTTP and their dry run, as a hostile admin-key holder drives them
(issue 25): writes change only allow-listed keys, and the dry run runs nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp.test_utils import TestClient

from proxy.app import CoreOptions, build_openai_app
from scheduler.config.root import load_config
from tests.fakes import write_dummy_gguf

TOML = {"Content-Type": "application/toml"}


def _text(tmp_path: Path, model: dict[str, Any] | None = None, *extra: dict[str, Any],
          **sections: Any) -> str:
    gguf = write_dummy_gguf(tmp_path / "a.gguf")
    server = {"ollama_enabled": False, "lmstudio_enabled": False,
              "admin_config_write": True, **sections.pop("server", {})}
    scheduler = {"slot_cache_dir": str(tmp_path / "slots"), **sections.pop("scheduler", {})}
    return tomli_w.dumps({"server": server, "scheduler": scheduler, **sections,
                          "models": [{"name": "a", "path": str(gguf), **(model or {})},
                                     *extra]})


@pytest.fixture
def served(aiohttp_client: Any, fake_llama: Path, tmp_path: Path) -> Any:
    async def start(text: str | None = None) -> tuple[TestClient, Path]:
        path = tmp_path / "corral.toml"
        path.write_text(text or _text(tmp_path))
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
        client = await aiohttp_client(build_openai_app(load_config(path), opts,
                                                       config_path=path))
        return client, path

    return start


@pytest.mark.parametrize(("edit", "key"), [
    ({"model": {"chat_template": "/etc/passwd"}}, "models.a.chat_template"),
    ({"extra": {"name": "b", "chat_template": "/etc/passwd"}}, "models.b.chat_template"),
    ({"scheduler": {"slot_cache_dir": "/tmp"}}, "scheduler.slot_cache_dir"),
    ({"model": {"args": ["--verbose"]}}, "models.a.args"),
    ({"model": {"env": {"LD_PRELOAD": "/tmp/x.so"}}}, "models.a.env.LD_PRELOAD"),
    ({"model": {"remotes": ["http://169.254.169.254"]}}, "models.a.remotes"),
    ({"server": {"workers": 2}}, "server.workers"),
])
async def test_writes_off_the_allow_list_are_refused_naming_the_key(
    served: Any, tmp_path: Path, edit: dict[str, Any], key: str
) -> None:
    client, path = await served()
    old = path.read_text()
    extra = edit.pop("extra", None)
    if extra is not None:
        # A new model on the served file (allowed alone) carrying the refused key.
        extra = {"path": str(tmp_path / "a.gguf"), **extra}
    text = _text(tmp_path, edit.pop("model", None), *([extra] if extra else []), **edit)
    resp = await client.put("/admin/config", data=text, headers=TOML)
    assert resp.status == 403, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "protected_config_key"
    assert key in error["message"] and "nothing written" in error["message"]
    assert path.read_text() == old
    report = await (await client.post("/admin/config/validate", data=text,
                                      headers=TOML)).json()
    assert not report["ok"]
    assert any("refused over HTTP" in e["message"] for e in report["errors"])


async def test_an_unknown_key_is_refused_naming_it(served: Any, tmp_path: Path) -> None:
    client, path = await served()
    old = path.read_text()
    text = old.replace("[server]\n", "[server]\nlaunch_command = \"/bin/sh\"\n")
    assert text != old
    resp = await client.put("/admin/config", data=text, headers=TOML)
    assert resp.status == 400
    assert "server.launch_command: unknown key" in (await resp.json())["error"]["message"]
    assert path.read_text() == old


async def test_allowed_knobs_are_written(served: Any, tmp_path: Path) -> None:
    client, path = await served()
    text = _text(tmp_path, {"ttl": 9, "ctx_size": 512, "aliases": ["b"]},
                 {"name": "c", "path": str(tmp_path / "a.gguf"), "parallel": 2},
                 scheduler={"max_instances": 2})
    resp = await client.put("/admin/config", data=text, headers=TOML)
    assert resp.status == 200, await resp.text()
    assert path.read_text() == text
