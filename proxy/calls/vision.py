"""Images in a call, in each family's spelling, and the 400 for a model that has no
projector to see them (instead of llama-server's own, less clear, refusal).

OpenAI chat: ``image_url`` content parts (Responses: ``input_image``); Anthropic:
``image`` blocks; Ollama: ``images`` on a message or on /api/generate. The bytes are
searched first, so a call without images is not parsed here at all.
"""

from __future__ import annotations

from typing import Any

from proxy.edge import jsonc
from scheduler.config.root import ModelConfig
from scheduler.errors import CannotServe
from scheduler.models.capabilities import capabilities
from scheduler.scheduling.scheduler import Scheduler

_PART_TYPES = frozenset({"image_url", "input_image", "image"})
_MARKERS = (b'"image_url"', b'"input_image"', b'"image"')


def _parts_have_images(messages: object) -> bool:
    for msg in messages if isinstance(messages, list) else ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in _PART_TYPES for p in content
        ):
            return True
    return False


def body_has_images(body: bytes | bytearray | None) -> bool:
    """Whether an OpenAI (chat or Responses) or Anthropic body carries an image."""
    if not body or not any(m in body for m in _MARKERS):
        return False
    try:
        payload = jsonc.loads(body)
    except Exception:  # malformed: llama-server's own error is the answer
        return False
    if not isinstance(payload, dict):
        return False
    inputs = payload.get("input")
    return _parts_have_images(payload.get("messages")) or _parts_have_images(
        inputs if isinstance(inputs, list) else None)


def ollama_has_images(body: dict[str, Any]) -> bool:
    if body.get("images"):
        return True
    messages = body.get("messages")
    return any(isinstance(m, dict) and m.get("images")
               for m in (messages if isinstance(messages, list) else ()))


def require_vision(scheduler: Scheduler, model: str, cfg: ModelConfig) -> None:
    """Raise a 400 (CannotServe) naming the models that can see images."""
    if "vision" in capabilities(cfg):
        return
    able = [n for n in scheduler.names() if "vision" in capabilities(scheduler.resolve(n))]
    raise CannotServe(model, "vision (image input: the model has no mmproj projector)", able)
