"""Real coding agents through Corral and the real llama-server with Gemma 3 270M:
Claude Code (`claude -p`) on the Anthropic Messages API of the main and the Ollama
port, Codex (`codex exec`) with a custom Responses provider on the main port and with
`--oss` on the Ollama and LM Studio ports. Both come from npm, pinned in
tests/e2e/js/package.json.

Each run must end with the model's own text, and every call the agent made must have
answered below 400: Corral's `corral_requests_total` counter, read before and after a
run, names each path (and `/`) with its status. The paths each agent calls are listed
here and in docs/compatibility.md.

The model's generation is capped server-side with a grammar given to llama-server
(`--grammar`): at most 80 plain characters, after which the only token left is the end
of the turn. A cap on the token count would not do: both agents send a large cap
(Claude Code 32,000 tokens) and treat an answer cut by a cap as an error ("Claude's
response exceeded the output token maximum"), and llama-server lets a request's
`max_tokens` override its own `--n-predict`; while Gemma 270M under a coding agent's
7,500-token system prompt rambles on and never ends its turn by itself. The grammar
also makes the output checkable: what the agent prints must be that text.

Agents run with telemetry, update checks and nonessential traffic off, a fresh HOME,
and a proxy on a closed loopback port for everything but loopback, so nothing they
try leaves the machine. Prompt processing is the cost (~300 tokens/s on 2 cores): one
Corral serves the whole module, so each agent's second run reuses the cached prompt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import CorralProc, free_ports, model_toml
from tests.fakes import stop, wait_healthy

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
JS = Path(__file__).resolve().parent / "js"
BIN = JS / "node_modules" / ".bin"
RUN_TIMEOUT = 600  # seconds per agent run: a cold 7,500-token prompt on 2 busy cores
TEXT = re.compile(r"[a-zA-Z0-9 ,.!?]{1,80}")
GRAMMAR = "root ::= [a-zA-Z0-9 ,.!?]{1,80}"
PROMPT = "Say hello."

# Paths each agent calls (Corral's route, as its metrics name it) on the port it uses.
CLAUDE_PATHS = {"/v1/messages"}
# Claude Code may probe the base URL first (HEAD /); 2.1.332 with nonessential
# traffic off did not here, but it is no error if it does.
CLAUDE_MAYBE = {"/"}
CODEX_PATHS = {"/v1/responses"}
CODEX_OLLAMA_PATHS = {"/v1/models", "/api/version", "/api/tags", "/v1/responses"}
CODEX_LMSTUDIO_PATHS = {"/v1/models", "/v1/responses"}

Calls = dict[tuple[str, str, int], float]


def agent(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        npm = shutil.which("npm")
        # `make test` installs Node.js and runs `npm ci`; a missing npm is a broken set-up.
        assert npm is not None, "npm is needed (make js-deps installs the agents)"
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    assert path.exists(), f"{path} missing after npm ci"
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
           gemma: Path) -> Iterator[CorralProc]:
    tmp = tmp_path_factory.mktemp("agents")
    port, oport, lport = free_ports(3)
    # ctx_size: Claude Code's prompt is ~4,000 Gemma tokens, Codex's ~4,500; 4096 is short.
    # ttl -1: the instance, and the prompt cached in its slot, outlive the idle time.
    models = model_toml("gemma", gemma, ctx_size=16384, threads=2, ttl=-1,
                        args=["--grammar", GRAMMAR])
    cfg = tmp / "corral.toml"
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_port = {oport}\n'
        f"lmstudio_port = {lport}\n\n[scheduler]\nhealth_interval = 0.02\n\n"
        f'[llama_server]\nbinary = "{llama_server_bin}"\n\n{models}'
    )
    log_path = tmp / "corral.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log_path)
        yield CorralProc(proc, port, oport, lport, log_path)
    finally:
        stop(proc, 30)


def calls(c: CorralProc) -> Calls:
    """Corral's per-call counter: (dialect, route, status) -> count."""
    text = httpx.get(f"{c.url}/metrics", timeout=10).text
    out: Calls = {}
    pattern = (r'^corral_requests_total\{dialect="([^"]*)",endpoint="([^"]*)",'
               r'model="[^"]*",status="(\d+)"\} (\S+)$')
    for m in re.finditer(pattern, text, re.M):
        if m[2].startswith(("/admin", "/metrics")):
            continue  # the test's own reads
        key = (m[1], m[2], int(m[3]))
        out[key] = out.get(key, 0.0) + float(m[4])
    return out


def made(before: Calls, after: Calls) -> Calls:
    return {k: n - before.get(k, 0.0) for k, n in after.items() if n > before.get(k, 0.0)}


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: no inherited keys or proxies, a fresh HOME, and every
    connection but loopback sent to a closed loopback port."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TERM": "dumb",
        "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
    }


def run_agent(c: CorralProc, argv: list[str], env: dict[str, str], cwd: Path) -> tuple[str, Calls]:
    cwd.mkdir(parents=True, exist_ok=True)
    before = calls(c)
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    during = made(before, calls(c))
    assert done.returncode == 0, (
        f"{argv[0]} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\n"
        f"calls: {during}\ncorral log:\n{c.log()[-4000:]}"
    )
    return done.stdout, during


def check(out: str, during: Calls, dialect: str, paths: set[str],
          maybe: frozenset[str] | set[str] = frozenset()) -> None:
    failed = {k: n for k, n in during.items() if k[2] >= 400}
    assert not failed, f"calls that answered >= 400: {failed}"
    assert {d for d, _, _ in during} == {dialect}, during
    assert paths <= {p for _, p, _ in during} <= paths | maybe, during
    # The run ends with the model's text: the grammar's characters, nothing else.
    assert TEXT.fullmatch(out.strip()), f"not the model's text: {out!r}"


# --- Claude Code --------------------------------------------------------------------------


def claude(c: CorralProc, port: int, tmp: Path) -> tuple[str, Calls]:
    env = base_env(tmp / "home") | {
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ANTHROPIC_API_KEY": "sk-corral-e2e",
        # Every model Claude Code would pick, the main one and the small fast one.
        "ANTHROPIC_MODEL": "gemma", "ANTHROPIC_SMALL_FAST_MODEL": "gemma",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "gemma", "ANTHROPIC_DEFAULT_SONNET_MODEL": "gemma",
        "ANTHROPIC_DEFAULT_OPUS_MODEL": "gemma",
        # Its own cap stays large: an answer stopped by it is an error to Claude Code.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "32000",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
    }
    return run_agent(c, [str(agent("claude")), "-p", PROMPT], env, tmp / "work")


def test_claude_code_on_the_main_port(served: CorralProc, tmp_path: Path) -> None:
    out, during = claude(served, served.port, tmp_path)
    check(out, during, "openai", CLAUDE_PATHS, CLAUDE_MAYBE)


def test_claude_code_on_the_ollama_port(served: CorralProc, tmp_path: Path) -> None:
    out, during = claude(served, served.ollama_port, tmp_path)
    check(out, during, "ollama", CLAUDE_PATHS, CLAUDE_MAYBE)


# --- Codex --------------------------------------------------------------------------------


def codex_env(tmp: Path, top: str = "", tables: str = "", **extra: str) -> dict[str, str]:
    """CODEX_HOME with a config.toml: update checks and analytics off. Top-level keys
    come before any [table] header, or they would belong to that table (a
    model_provider under [analytics] left Codex on OpenAI's, through the dead proxy)."""
    home = tmp / "codex-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f"check_for_update_on_startup = false\n{top}\n[analytics]\nenabled = false\n\n{tables}"
    )
    return base_env(tmp / "home") | {"CODEX_HOME": str(home)} | extra


def test_codex_with_a_responses_provider_on_the_main_port(served: CorralProc,
                                                          tmp_path: Path) -> None:
    top = 'model = "gemma"\nmodel_provider = "corral"\n'
    provider = (
        f'[model_providers.corral]\nname = "corral"\nbase_url = "{served.url}/v1"\n'
        'wire_api = "responses"\nrequest_max_retries = 0\nstream_max_retries = 0\n'
    )
    env = codex_env(tmp_path, top, provider)
    argv = [str(agent("codex")), "exec", "--skip-git-repo-check", PROMPT]
    out, during = run_agent(served, argv, env, tmp_path / "work")
    check(out, during, "openai", CODEX_PATHS)


@pytest.mark.parametrize(("provider", "dialect", "paths"), [
    ("ollama", "ollama", CODEX_OLLAMA_PATHS),
    ("lmstudio", "lmstudio", CODEX_LMSTUDIO_PATHS),
])
def test_codex_oss_on_the_local_ports(served: CorralProc, tmp_path: Path, provider: str,
                                      dialect: str, paths: set[str]) -> None:
    port = served.ollama_port if provider == "ollama" else served.lmstudio_port
    # Codex's built-in local providers default to ports 11434 and 1234;
    # CODEX_OSS_BASE_URL points either at Corral's port.
    env = codex_env(tmp_path, CODEX_OSS_BASE_URL=f"http://127.0.0.1:{port}/v1")
    model = "gemma:latest" if provider == "ollama" else "gemma"
    argv = [str(agent("codex")), "exec", "--skip-git-repo-check", "--oss",
            "--local-provider", provider, "-m", model, PROMPT]
    out, during = run_agent(served, argv, env, tmp_path / "work")
    check(out, during, dialect, paths)
