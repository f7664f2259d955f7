"""`corral check` catches a model that can never fit the memory budget."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from proxy.cli import main


def tiny_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("budget", "code"), [("'10MiB'", 2), ("'1GiB'", 0), ("'none'", 0)])
def test_check_compares_footprints_with_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str, code: int
) -> None:
    model = tiny_gguf(tmp_path / "m.gguf")
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        f"[scheduler]\nmemory_budget = {budget}\n"
        f'[[models]]\nname = "m"\npath = "{model}"\nctx_size = 2048\n'
    )
    assert main(["check", str(cfg)]) == code
    err = capsys.readouterr().err
    if code:
        assert "model 'm': needs 65 MiB but the memory budget is 10 MiB" in err


def test_init_can_generate_an_lmstudio_sdk_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import re
    import tomllib

    from proxy.dialects.lmstudio_sdk.socket import authenticate

    out = tmp_path / "corral.toml"
    assert main(["init", str(out), "--api-key"]) == 0
    keys = tomllib.loads(out.read_text())["server"]["api_keys"]
    assert len(keys) == 1 and re.fullmatch(r"sk-lm-[A-Za-z0-9]{8}:[A-Za-z0-9]{20}", keys[0])
    assert keys[0] in capsys.readouterr().out
    ident, passkey = keys[0].removeprefix("sk-lm-").split(":")
    packet = {"authVersion": 1, "clientIdentifier": ident, "clientPasskey": passkey}
    assert authenticate(packet, tuple(keys)) is None
