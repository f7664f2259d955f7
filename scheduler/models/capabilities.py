"""What a model can serve: chat, completion, embedding, rerank, vision, audio, tools,
infill, speech, image.

Derived from the model's built-in media runtime (sd-server: image, kokoro: speech), its
launch flags (``embedding``, ``rerank``, ``--mmproj``) and,
where the proxy has read it, its GGUF header (fill-in-the-middle tokens); the config's
``capabilities`` list overrides both. The proxy refuses a call a model cannot serve
with a 400 that names the models that can, instead of launching it for nothing or
relaying a confusing upstream error.
"""

from __future__ import annotations

from scheduler.config.models import RUNTIME_CAPABILITIES
from scheduler.config.root import Capability, ModelConfig

_MMPROJ = ("--mmproj", "-mm", "--mmproj-url", "-mmu")
_EMBEDDING_FLAGS = ("--embedding", "--embeddings")
# A chat model served by llama-server: --jinja (its default) parses tool calls for
# any template, with a generic JSON format where the template has none.
_GENERATIVE: frozenset[Capability] = frozenset({"chat", "completion", "tools", "infill"})


def has_mmproj(cfg: ModelConfig) -> bool:
    return cfg.mmproj is not None or any(a.split("=")[0] in _MMPROJ for a in cfg.args)


def is_embedding(cfg: ModelConfig) -> bool:
    return cfg.embedding or any(a in _EMBEDDING_FLAGS for a in cfg.args)


def is_rerank(cfg: ModelConfig) -> bool:
    return cfg.rerank or any(a in ("--rerank", "--reranking") for a in cfg.args)


def capabilities(cfg: ModelConfig, *, fim: bool | None = None) -> frozenset[Capability]:
    """``fim``: whether the GGUF has fill-in-the-middle tokens (None: not read yet)."""
    if cfg.capabilities is not None:
        return frozenset(cfg.capabilities)
    media = RUNTIME_CAPABILITIES.get(cfg.runtime or "")
    if media is not None:
        return frozenset(media)
    if is_rerank(cfg):
        return frozenset({"rerank"})
    if is_embedding(cfg):
        return frozenset({"embedding"})
    caps = set(_GENERATIVE)
    if fim is False:
        caps.discard("infill")
    if has_mmproj(cfg):
        # A projector may be for images or audio; llama-server says which at call
        # time, so both are offered and its own error is relayed.
        caps |= {"vision", "audio"}
    return frozenset(caps)
