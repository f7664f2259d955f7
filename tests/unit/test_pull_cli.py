"""`corral pull`: the progress bar, and the download it does itself when no Corral
answers (through the fake Hub, in a thread of its own)."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ops.pull_cli import cmd_pull, draw, render
from scheduler.config.root import CorralConfig
from tests.fakes.hf_hub import FakeHub, hub_in_thread

LINES = [
    {"status": "pulling manifest"},
    {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 4_000_000,
     "completed": 0},
    {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 4_000_000,
     "completed": 2_000_000},
    {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 4_000_000,
     "completed": 4_000_000},
    {"status": "verifying sha256 digest"},
    {"status": "success"},
]


def test_render_bar() -> None:
    assert render(LINES[2]) == (
        "pulling 0123456789ab  50% |" + "█" * 15 + " " * 15 + "| 2 MB/4 MB")
    assert render({"status": "success"}) == "success"
    assert render({"error": "boom"}) == "error: boom"


def test_draw_without_a_terminal_prints_each_file_once_started_once_done() -> None:
    out = io.StringIO()
    assert draw(LINES, out) is True
    text = out.getvalue().splitlines()
    assert text[0] == "pulling manifest"
    assert [t for t in text if t.startswith("pulling 0123")] == [
        render(LINES[1]), render(LINES[3])]
    assert text[-1] == "success"
    assert draw([LINES[0], {"error": "nope"}], io.StringIO()) is False


@pytest.fixture
def hub_url() -> Iterator[tuple[str, FakeHub]]:
    fake = FakeHub({"org/r/m-Q4_K_M.gguf": b"GGUF" + bytes(2000)})
    with hub_in_thread(fake) as url:
        yield url, fake


def test_pulls_into_the_cache_when_no_corral_answers(
        hub_url: tuple[str, FakeHub], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, fake = hub_url
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    args = argparse.Namespace(name="hf.co/org/r", url="http://127.0.0.1:9")
    assert cmd_pull(args, CorralConfig()) == 0
    err = capsys.readouterr().err
    assert "no Corral answers" in err and err.rstrip().endswith("success")
    files = list((tmp_path / "models" / "huggingface").rglob("m-Q4_K_M.gguf"))
    assert len(files) == 1 and files[0].read_bytes() == b"GGUF" + bytes(2000)
    assert fake.downloads == 1
    args = argparse.Namespace(name="not-a-hub-name", url="http://127.0.0.1:9")
    assert cmd_pull(args, CorralConfig()) == 1
    assert "neither hf.co" in capsys.readouterr().err
