"""The versions the Ollama and LM Studio ports report satisfy every client that
gates on them (proxy/dialects/versions.py says why each minimum exists)."""

from __future__ import annotations

import pytest

from proxy.dialects.versions import LMSTUDIO_VERSION, OLLAMA_VERSION


def numbers(version: str) -> tuple[int, ...]:
    # Open WebUI's own parse: int() of each dot-separated part, so a suffix fails here too.
    return tuple(int(part) for part in version.split("."))


# (client, the least version it accepts or needs for what the suite drives)
OLLAMA_MINIMUMS = [
    # "Ollama 0.12.6 is too old. Codex requires Ollama 0.13.4 or newer."
    ("codex exec --oss --local-provider ollama (@openai/codex 0.171.0)", "0.13.4"),
    # Ollama's Anthropic Messages API, which Claude Code uses on the Ollama port.
    ("claude -p with ANTHROPIC_BASE_URL at the Ollama port", "0.14.0"),
    # Open WebUI compares the parsed number with its minimum.
    ("Open WebUI", "0.1.16"),
]

LMSTUDIO_MINIMUMS = [
    # The REST v1 API (/api/v1/models, /api/v1/chat) that Corral's port serves.
    ("LM Studio REST v1 clients", "0.4.0"),
    # @lmstudio/sdk 1.5.0 and the lmstudio Python package read system.version.
    ("@lmstudio/sdk 1.5.0 getLMStudioVersion()", "0.3.0"),
]


@pytest.mark.parametrize(("client", "least"), OLLAMA_MINIMUMS)
def test_ollama_version_satisfies(client: str, least: str) -> None:
    assert numbers(OLLAMA_VERSION) >= numbers(least), f"{client} needs Ollama {least}"


@pytest.mark.parametrize(("client", "least"), LMSTUDIO_MINIMUMS)
def test_lmstudio_version_satisfies(client: str, least: str) -> None:
    assert numbers(LMSTUDIO_VERSION) >= numbers(least), f"{client} needs LM Studio {least}"


def test_the_old_ollama_number_is_what_codex_refused() -> None:
    # The comparison above is the one that failed: 0.12.6 < 0.13.4.
    assert numbers("0.12.6") < numbers(dict(OLLAMA_MINIMUMS)[OLLAMA_MINIMUMS[0][0]])
