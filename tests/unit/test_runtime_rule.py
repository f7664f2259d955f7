"""The runtime-model rule (scheduler/models/runtime.py): only writable parameters,
only files inside the scan roots or the cache, as the scanner names them."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.errors import BadRequest
from scheduler.models import runtime
from scheduler.models.runtime import RuntimeModel


def config(root: Path) -> CorralConfig:
    return CorralConfig(scheduler={"scan": [str(root)]})


@pytest.mark.parametrize("key", ["args", "env", "path", "package", "hf_repo", "runtime",
                                 "chat_template", "mmproj", "lora", "remotes", "origin",
                                 "upstream_model"])
def test_every_protected_key_is_refused_with_why(key: str) -> None:
    with pytest.raises(BadRequest, match=f"'{key}' is a protected key"):
        runtime.check_params({key: "x"})


def test_parameters_pass_and_unset_ones_are_dropped() -> None:
    got = runtime.check_params({"ctx_size": 2048, "parallel": 2, "ttl": None,
                                "replicas": {"min": 0, "max": 2}})
    assert got == {"ctx_size": 2048, "parallel": 2, "replicas": {"min": 0, "max": 2}}


@pytest.mark.parametrize("where", ["../outside.gguf", "sub/../../outside.gguf"])
def test_a_path_that_climbs_out_of_the_roots_is_refused(tmp_path: Path, where: str) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    entry = RuntimeModel("x", "y", {"path": str(root / where)}, {})
    with pytest.raises(BadRequest, match="outside the scan roots"):
        runtime.restore(entry, config(root))


def test_a_link_inside_a_root_is_served_as_the_scanner_names_it(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "disk"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "m.gguf").write_bytes(b"GGUF")
    (root / "m.gguf").symlink_to(elsewhere / "m.gguf")
    base = ModelConfig(name="m", path=root / "m.gguf", origin="scan:plain")
    entry, model = runtime.create("m-2k", base, {"ctx_size": 2048}, config(root))
    assert (model.path, model.ctx_size, model.origin) == (root / "m.gguf", 2048, "runtime")
    assert runtime.restore(entry, config(root)) == model


def test_a_configured_model_is_no_base(tmp_path: Path) -> None:
    base = ModelConfig(name="m", path=tmp_path / "m.gguf")
    with pytest.raises(BadRequest, match="scan roots or its cache"):
        runtime.create("m-2k", base, {}, config(tmp_path))


def test_the_file_round_trips(tmp_path: Path) -> None:
    entries = [RuntimeModel("a", "b", {"path": "/x/a.gguf"}, {"ctx_size": 1024}),
               RuntimeModel("c", "hf.co/o/r:Q4", {"hf_repo": "o/r", "hf_file": "r.gguf",
                                                  "hf_revision": "abc"}, {"parallel": 2})]
    path = runtime.file_beside(tmp_path / "corral.toml")
    assert path == tmp_path / "corral.runtime.toml"
    runtime.write(path, entries)
    assert runtime.read(path) == entries
    assert runtime.read(tmp_path / "none.toml") == []
