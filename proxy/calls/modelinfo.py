"""What a model's GGUF file says about it, for /api/tags, /api/show, /api/ps and LM
Studio's model lists.

Reading a header takes a fraction of a second (and the file may sit on a slow disk),
so it runs in a worker thread and is remembered per file. A model whose file is not
there yet (a package not assembled before its first launch) gets placeholder facts
that are not remembered: listing models must never copy hundreds of megabytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.dialects.translate import human_number
from scheduler.config.root import ModelConfig
from scheduler.errors import CorralError
from scheduler.models.capabilities import capabilities as model_capabilities
from scheduler.models.gguf_file import GgufInfo, read_gguf_info
from scheduler.models.sources import materialised_file

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class ModelFacts:
    path: Path | None
    size: int = 0
    modified: float = 0.0
    digest: str = ""
    info: GgufInfo | None = None
    chat_template: str = ""
    license: str = ""
    has_fim: bool = False
    # GGUF metadata as Ollama's /api/show model_info: scalars and short arrays; long
    # arrays (tokenizer vocabularies) as null, as Ollama shows them without verbose.
    model_info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.info.architecture if self.info else ""

    @property
    def quantization(self) -> str:
        return (self.info.quantization or "") if self.info else ""

    @property
    def parameter_size(self) -> str:
        if self.info is None:
            return ""
        if self.info.parameter_count:
            return human_number(self.info.parameter_count)
        return self.info.size_label or ""

    @property
    def context_length(self) -> int | None:
        return self.info.context_length if self.info else None

    def details(self) -> dict[str, Any]:
        """Ollama's ``details`` object."""
        arch = self.architecture
        return {
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }

    @property
    def native_tools(self) -> bool:
        """Whether the model's own chat template knows about tools."""
        return "tools" in self.chat_template

    @property
    def thinking(self) -> bool:
        t = self.chat_template
        return "<think>" in t or "enable_thinking" in t or "reasoning_content" in t


def vision(cfg: ModelConfig) -> bool:
    return "vision" in model_capabilities(cfg)


def embedding(cfg: ModelConfig) -> bool:
    return "embedding" in model_capabilities(cfg)


# Corral's capability names as Ollama spells them.
_OLLAMA_NAMES = {"chat": "completion", "tools": "tools", "vision": "vision",
                 "infill": "insert", "embedding": "embedding"}


def capabilities(cfg: ModelConfig, facts: ModelFacts) -> list[str]:
    """Ollama's capability names, from ``scheduler.models.capabilities`` and the GGUF."""
    caps = model_capabilities(cfg, fim=facts.has_fim)
    out = [name for ours, name in _OLLAMA_NAMES.items() if ours in caps]
    if facts.thinking and "completion" in out:
        out.insert(out.index("completion") + 1, "thinking")
    return out


_QUANT_BITS = re.compile(r"^(?:I?Q|F|BF)(\d+)")


def bits_per_weight(quantization: str) -> int | None:
    """The nominal bits of a quantisation name: Q4_K_M -> 4, IQ2_XS -> 2, BF16 -> 16."""
    m = _QUANT_BITS.match(quantization.upper())
    return int(m.group(1)) if m else None


# --- reading (blocking; run in a thread) -----------------------------------------------


def _metadata(path: Path) -> dict[str, object]:
    from scheduler.models.gguf_file import read_gguf_metadata

    return read_gguf_metadata(path)


def _json_value(value: object) -> object:
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
        return value
    return None


def read_facts(path: Path) -> ModelFacts:
    stat = path.stat()
    digest = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    base = ModelFacts(path=path, size=stat.st_size, modified=stat.st_mtime, digest=digest)
    try:
        info = read_gguf_info(path)
        meta = _metadata(path)
    except CorralError as e:
        log.info("no GGUF metadata for %s: %s", path, e.message)
        return base
    template = meta.get("tokenizer.chat_template")
    model_info = {k: _json_value(v) for k, v in meta.items() if k != "tokenizer.chat_template"}
    model_info["general.parameter_count"] = info.parameter_count
    lic = meta.get("general.license")
    return ModelFacts(
        path=path,
        size=base.size,
        modified=base.modified,
        digest=digest,
        info=info,
        chat_template=template if isinstance(template, str) else "",
        license=lic if isinstance(lic, str) else "",
        has_fim=any(
            k in meta for k in ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")
        ),
        model_info=dict(sorted(model_info.items())),
    )


def _facts_for(cfg: ModelConfig) -> ModelFacts:
    path = materialised_file(cfg)
    return ModelFacts(path=None) if path is None else read_facts(path)


class ModelInfoCache:
    """Facts per model file, read once off the event loop; concurrent callers for the
    same model wait for the first read instead of starting another."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, Path | None, str | None], ModelFacts] = {}
        self._locks: dict[tuple[str, Path | None, str | None], asyncio.Lock] = {}

    async def get(self, cfg: ModelConfig) -> ModelFacts:
        key = (cfg.name, cfg.path, cfg.package)
        facts = self._done.get(key)
        if facts is not None:
            return facts
        async with self._locks.setdefault(key, asyncio.Lock()):
            facts = self._done.get(key)
            if facts is None:
                facts = await asyncio.to_thread(_facts_for, cfg)
                if facts.path is not None:
                    self._done[key] = facts
            return facts

    async def many(self, cfgs: list[ModelConfig]) -> dict[str, ModelFacts]:
        """Facts per configured model name."""
        unique = {c.name: c for c in cfgs}
        found = await asyncio.gather(*(self.get(c) for c in unique.values()))
        return dict(zip(unique, found, strict=True))


# Each port app has its own cache; the key belongs in proxy/keys.py (see the report).
MODEL_INFO = web.AppKey("model_info", ModelInfoCache)
