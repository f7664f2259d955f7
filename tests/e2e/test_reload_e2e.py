"""Config reload of a real `corral serve` with the real llama-server and Gemma 3 270M:
a broken file written while a model loads leaves Corral serving on the old config;
a good one changes only what changed; SIGHUP reloads too."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import CorralProc, model_toml, wait_until

pytestmark = pytest.mark.e2e


def get(c: CorralProc, path: str) -> Any:
    r = httpx.get(c.url + path, timeout=10)
    r.raise_for_status()
    return r.json()


def chat(c: CorralProc, model: str) -> httpx.Response:
    return httpx.post(
        c.url + "/v1/chat/completions",
        timeout=120,
        json={"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
    )


def state(c: CorralProc, model: str) -> str:
    return {m["name"]: m["state"] for m in get(c, "/admin/models")["models"]}[model]


def test_broken_config_during_a_load_keeps_serving_the_old_one(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    c = corral(model_toml("gemma", gemma))
    path = tmp_path / "corral-0.toml"  # what the corral fixture wrote
    good = path.read_text()
    assert get(c, "/admin/config")["path"] == str(path)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(chat, c, "gemma")
        wait_until(lambda: state(c, "gemma") == "loading", timeout=20, step=0.01)
        path.write_text(good + "\n[[models]]\nname = \n")  # not TOML
        wait_until(lambda: get(c, "/admin/config")["last_reload_error"] is not None)
        assert first.result(timeout=120).status_code == 200

    cfg = get(c, "/admin/config")
    assert "invalid TOML" in cfg["last_reload_error"] and str(path) in cfg["last_reload_error"]
    assert [m["name"] for m in cfg["config"]["models"]] == ["gemma"]
    metrics = httpx.get(c.url + "/metrics", timeout=10).text
    assert "corral_config_reload_success 0.0" in metrics
    assert "config reload (file) failed" in c.log()
    assert chat(c, "gemma").status_code == 200
    (inst,) = get(c, "/admin/instances")["instances"]

    # A good file: the new model is added, the unchanged one keeps its process.
    path.write_text(good + model_toml("second", gemma))
    wait_until(lambda: get(c, "/admin/config")["last_reload_error"] is None)
    last = get(c, "/admin/config")["last_reload"]
    assert last["changes"]["added"] == ["second"]
    assert last["changes"]["unchanged"] == ["gemma"]
    assert [i["pid"] for i in get(c, "/admin/instances")["instances"]] == [inst["pid"]]
    assert "corral_config_reload_success 1.0" in httpx.get(c.url + "/metrics", timeout=10).text
    assert chat(c, "second").status_code == 200

    # SIGHUP reloads the same file again: nothing changes, nothing restarts.
    c.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: get(c, "/admin/config")["last_reload"]["source"] == "SIGHUP")
    assert get(c, "/admin/config")["last_reload"]["changes"]["changed"] == []
    time.sleep(0.2)
    assert inst["pid"] in [i["pid"] for i in get(c, "/admin/instances")["instances"]]


def test_a_dry_run_and_a_write_run_nothing_the_edit_names(
    corral: Callable[..., CorralProc], gemma: Path, tmp_path: Path
) -> None:
    """Issue 25's reproducers against a real `corral serve`: a dry run naming
    ``venv.__main__`` made Corral exit with every port and child, ``this`` printed the
    Zen of Python into its log; a new model reusing the served file with
    ``chat_template = "/etc/passwd"`` served the file back through /props."""
    c = corral(model_toml("gemma", gemma, chat_template="gemma3"),
               server="admin_config_write = true")
    toml = {"Content-Type": "application/toml"}
    original = httpx.get(c.url + "/admin/config/file", timeout=10).text
    for package in ("venv.__main__", "this", ".."):
        edit = original + f'\n[[models]]\nname = "p"\npackage = "{package}"\n'
        r = httpx.post(c.url + "/admin/config/validate", content=edit, headers=toml,
                       timeout=30)
        assert r.status_code == 200, r.text
        assert not r.json()["ok"] and "package" in r.json()["errors"][0]["message"]
    assert c.proc.poll() is None
    assert httpx.get(c.url + "/health", timeout=10).status_code == 200
    passwd = original + (f'\n[[models]]\nname = "leak"\npath = "{gemma.resolve()}"\n'
                         'ctx_size = 1024\nparallel = 1\nthreads = 1\n'
                         'chat_template = "/etc/passwd"\n')
    r = httpx.put(c.url + "/admin/config", content=passwd, headers=toml, timeout=30)
    assert r.status_code == 403 and "models.leak.chat_template" in r.text
    assert "leak" not in [m["id"] for m in get(c, "/v1/models")["data"]]
    log = c.log()
    assert "Beautiful is better than ugly" not in log and "Traceback" not in log
