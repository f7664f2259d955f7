"""llama-server flags that would break every answer are refused when a config is
loaded (start, reload, `corral check`, the dashboard's dry run): `--chat-template NAME`
under --jinja turns every prompt into the word NAME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.config.checks import check_problems
from scheduler.config.models import jinja_problem
from scheduler.config.root import load_config
from scheduler.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CORRAL_"):
            monkeypatch.delenv(name)


def model(extra: str, name: str = "g") -> str:
    return f'[[models]]\nname = "{name}"\npath = "/m.gguf"\n{extra}\n'


def refusal(tmp_path: Path, text: str) -> str:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    lines = exc.value.message.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: ")
    return lines[0]


@pytest.mark.parametrize("args", [
    '["--chat-template", "gemma"]',
    '["--chat-template=gemma"]',
    '["--no-jinja", "--jinja", "--chat-template", "gemma"]',  # the last word wins
])
def test_a_template_name_in_a_models_args_is_refused_with_the_fix(
        tmp_path: Path, args: str) -> None:
    line = refusal(tmp_path, model(f"args = {args}"))
    assert "model 'g': " in line and "--chat-template" in line
    assert "every prompt would become the words 'gemma'" in line
    assert 'chat_template = "FILE"' in line and "--chat-template-file" in line
    assert "gemma3" in line  # the template Corral ships, named as a choice


def test_a_shipped_name_is_fixed_by_chat_template_itself(tmp_path: Path) -> None:
    line = refusal(tmp_path, model('args = ["--chat-template=gemma3"]'))
    assert 'use chat_template = "gemma3" instead' in line
    line = refusal(tmp_path, model('args = ["--chat-template", "/t/x.jinja"]'))
    assert 'use chat_template = "/t/x.jinja" instead' in line


@pytest.mark.parametrize("text", [
    model('args = ["--chat-template", "chatml"]'),  # still a name under --jinja
    model("args = [\"--chat-template\", \"{% for m in messages %}{{ m.content }}{% endfor %}\"]"),
    model('args = ["--no-jinja", "--chat-template", "gemma"]'),  # the old meaning
    model('args = ["--chat-template-file", "/t/gemma.jinja"]'),
    model('chat_template = "gemma3"'),
    model('env = { LLAMA_ARG_JINJA = "false", LLAMA_ARG_CHAT_TEMPLATE = "gemma" }'),
    # Another engine's --chat-template is its own.
    model('runtime = "vllm"\nargs = ["--chat-template", "chatml-ish"]'),
])
def test_what_still_works_is_accepted(tmp_path: Path, text: str) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    load_config(path)


@pytest.mark.parametrize(("text", "where"), [
    ('[llama_server]\nargs = ["--chat-template", "gemma"]\n', "llama_server: "),
    ('[llama_server]\nenv = { LLAMA_ARG_CHAT_TEMPLATE = "gemma" }\n', "llama_server: "),
    (model('env = { LLAMA_ARG_CHAT_TEMPLATE = "llama3" }'), "model 'g': "),
    ('[[scan]]\npath = "/models"\nargs = ["--chat-template=gemma"]\n', "scan.0.args: "),
    # A runtime that runs llama-server: another build, or a command naming it.
    ('[runtimes.ik]\nbinary = "/opt/ik/llama-server"\n'
     + model('runtime = "ik"\nargs = ["--chat-template", "gemma"]'), "model 'g': runtime 'ik'"),
    ('[runtimes.mine]\ncommand = ["/opt/llama-server", "--port", "${PORT}", '
     '"--chat-template", "gemma", "${ARGS}"]\n' + model('runtime = "mine"'),
     "model 'g': runtime 'mine'"),
])
def test_every_place_llama_server_flags_come_from_is_checked(
        tmp_path: Path, text: str, where: str) -> None:
    line = refusal(tmp_path, text)
    assert where in line and "every prompt would become the words" in line, line


def test_jinja_problem_reads_the_environment_before_the_command_line() -> None:
    assert jinja_problem(["--jinja"], {"LLAMA_ARG_JINJA": "0",
                                       "LLAMA_ARG_CHAT_TEMPLATE": "gemma"}) is not None
    assert jinja_problem([], {"LLAMA_ARG_JINJA": "off",
                              "LLAMA_ARG_CHAT_TEMPLATE": "gemma"}) is None
    assert jinja_problem(["--chat-template"], {}) is None  # llama-server's own error
    assert jinja_problem(["-m", "x.gguf"], {}) is None


def test_check_reports_a_chat_template_that_names_nothing(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    path = tmp_path / "corral.toml"
    path.write_text(f'[[models]]\nname = "g"\npath = "{gguf}"\nchat_template = "gemma"\n')
    lines = [p for p in check_problems(path, load_config(path)) if "chat_template" in p]
    assert lines == [f"{path}: model 'g': chat_template: 'gemma' is neither a file nor a "
                     "template Corral ships (gemma3)"]


def test_corral_check_refuses_a_template_name(tmp_path: Path) -> None:
    """The command an operator runs, as a process: exit 2, the model, flag and fix."""
    path = tmp_path / "corral.toml"
    path.write_text(model('args = ["--ctx-shift", "--chat-template", "gemma"]'))
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out
    assert "model 'g'" in out.stderr and "'--chat-template', 'gemma'" in out.stderr
    assert "--chat-template-file" in out.stderr and "Traceback" not in out.stderr
