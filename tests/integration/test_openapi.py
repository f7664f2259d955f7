"""``/openapi.json`` on every port, and a schemathesis run over all of it.

Corral runs as a real ``corral serve`` process around the fake llama-server; the
schemathesis CLI (seeded, 5 examples per operation and phase, 10 s per request,
bounded by a timeout) checks that nothing answers a 5xx and every answer matches the
schema its route declares. Excluded: the admin API (it drains and reloads Corral,
which the fuzzer would do between its own calls) and Ollama's push/create/blob
uploads, which answer 501 Not Supported on purpose. Every route, the admin API
included, is fuzzed from the routers in ``test_fuzz_routes.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import HERE, fake_binary, free_port, wait_healthy, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]
EXCLUDED = r"^/admin|^/api/(push|create|blobs)"


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    root = tmp_path_factory.mktemp("openapi")
    fake = fake_binary(root / "bin")
    ports = [free_port() for _ in range(3)]
    models = "".join(
        f'[[models]]\nname = "{name}"\npath = "{write_dummy_gguf(root / f"{name}.gguf")}"\n{extra}'
        for name, extra in (("m", ""), ("emb", "embedding = true\n"), ("rr", "rerank = true\n"),
                            ("aud", 'capabilities = ["audio"]\n'),
                            # Speech and image engines: the fake, as the built-ins.
                            ("sd", 'runtime = "sd-server"\nenv = {FAKE_IMAGE_SECONDS = "0.01"}\n'),
                            ("tts", 'runtime = "kokoro"\nenv = {FAKE_SPEECH_PACE = "0"}\n'))
    )
    media = json.dumps([sys.executable, str(HERE / "fake_media.py"), "--host", "${HOST}",
                        "--port", "${PORT}"])
    models += f"[runtimes.sd-server]\ncommand = {media}\n[runtimes.kokoro]\ncommand = {media}\n"
    cfg = root / "corral.toml"
    cfg.write_text(
        f"[server]\nport = {ports[0]}\nollama_port = {ports[1]}\nlmstudio_port = {ports[2]}\n"
        f'[llama_server]\nbinary = "{fake}"\n{models}'
    )
    log = (root / "corral.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{ports[0]}", proc, root / "corral.log")
        yield ports
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        text = (root / "corral.log").read_text(errors="replace")
        # Whatever the fuzzer sent, nothing reached the log as a traceback.
        assert "Traceback" not in text, text[-4000:]


def test_every_mounted_route_is_documented(ports: list[int]) -> None:
    for port, sample in zip(ports, ("/v1/messages", "/api/chat", "/api/v0/models"), strict=True):
        doc = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
        assert doc["openapi"].startswith("3.")
        assert sample in doc["paths"] and "/v1/chat/completions" in doc["paths"]
    main = httpx.get(f"http://127.0.0.1:{ports[0]}/openapi.json", timeout=10).json()
    assert {"/tokenize", "/props", "/v1/audio/transcriptions", "/admin/instances"} <= set(
        main["paths"])
    # Speech and images (issue 30), on the main port and where LM Studio clients call.
    media = {"/v1/audio/speech", "/v1/audio/voices", "/v1/audio/translations",
             "/v1/images/generations", "/v1/images/edits", "/v1/images/variations"}
    assert media | {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/sd-models"} <= set(
        main["paths"])
    lmstudio = httpx.get(f"http://127.0.0.1:{ports[2]}/openapi.json", timeout=10).json()
    assert media <= set(lmstudio["paths"])
    speech = main["paths"]["/v1/audio/speech"]["post"]
    assert "audio/*" in speech["responses"]["200"]["content"]
    edit = main["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert set(edit["multipart/form-data"]["schema"]["properties"]) == {"model", "image", "mask"}
    body = main["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]
    schema = main["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert schema["properties"]["model"]["enum"] == ["m", "emb", "rr", "aud", "sd", "tts"]
    assert "max_tokens" in schema["required"]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["main", "ollama", "lmstudio"])
def test_schemathesis_finds_no_5xx_and_no_schema_break(ports: list[int], which: int) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a test dependency (pip install -e .[test])"
    url = f"http://127.0.0.1:{ports[which]}/openapi.json"
    done = subprocess.run(
        [st, "run", url, "--max-examples", "5", "--seed", "20261202",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--exclude-path-regex", EXCLUDED, "--request-timeout", "10", "--no-color"],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout
