"""Speech and images end to end (issue 30): a real `corral serve` with the real
llama-server serving Gemma 3 270M beside the built-in ``sd-server`` and ``kokoro``
runtimes (their commands pointed at ``tests/fakes/fake_media.py``: neither engine nor
a model for it can be installed here, see docs/engines.md), under
``max_instances = 1``. The ``openai`` client generates speech and images while the
chat model is swapped out and back; every call is answered."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, Tidy, model_toml
from tests.fakes import HERE
from tests.fakes.fake_media import image_bytes, speech_bytes

pytestmark = pytest.mark.e2e


def _chat(api: openai.OpenAI) -> None:
    r = api.chat.completions.create(model="gemma", max_tokens=4,
                                    messages=[{"role": "user", "content": "Say hi"}])
    assert r.choices[0].message.content is not None


def _launches(c: CorralProc, model: str) -> int:
    text = httpx.get(c.url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines()
                if x.startswith(f'corral_instance_launches_total{{model="{model}",result="ok"}}'))
    return int(float(line.rsplit(" ", 1)[1]))


def test_speech_and_images_while_the_chat_model_swaps(
        corral, gemma: Path, tmp_path: Path, tidy: Tidy) -> None:
    media = json.dumps([sys.executable, str(HERE / "fake_media.py"), "--host", "${HOST}",
                        "--port", "${PORT}", "${ARGS}"])
    config = (model_toml("gemma", gemma) + f"""
[[models]]
name = "sd"
runtime = "sd-server"
path = "{gemma}"
env = {{ FAKE_IMAGE_SECONDS = "1.0" }}

[[models]]
name = "tts"
runtime = "kokoro"
upstream_model = "kokoro"

[runtimes.sd-server]
command = {media}

[runtimes.kokoro]
command = {media}
""")
    c: CorralProc = corral(config, scheduler="max_instances = 1")
    api = tidy(openai.OpenAI(base_url=c.url + "/v1", api_key="none", max_retries=0, timeout=120))
    _chat(api)
    out = tmp_path / "hello.mp3"
    with api.audio.speech.with_streaming_response.create(
            model="tts", voice="af_bella", input="Hello there") as resp:
        resp.stream_to_file(out)
    assert out.read_bytes() == speech_bytes("Hello there", 8, 4096)
    _chat(api)
    image = api.images.generate(model="sd", prompt="a corral at dawn")
    assert image.data is not None
    assert base64.b64decode(image.data[0].b64_json or "") == image_bytes(
        "a corral at dawn", 0, 1024)
    _chat(api)
    edited = api.images.edit(model="sd", prompt="add a horse",
                             image=("in.png", b"\x89PNG" + b"\0" * 70_000, "image/png"))
    assert edited.data is not None and edited.data[0].b64_json
    _chat(api)
    # Gemma was swapped out for each of them and back: four launches of the real
    # llama-server, each answering.
    assert _launches(c, "gemma") == 4
    assert _launches(c, "sd") == 2 and _launches(c, "tts") == 1
    # LM Studio clients send the same calls to their port.
    lm = tidy(openai.OpenAI(base_url=f"http://127.0.0.1:{c.lmstudio_port}/v1", api_key="none",
                            max_retries=0, timeout=120))
    assert lm.images.generate(model="sd", prompt="again").data
