"""Request policy on the call path: the operator's rules (scheduler/config/policy.py)
applied to the body one upstream receives, after any translation.

``upstream._attempts`` asks ``shape_for`` once per attempt, and only when some name
has a policy or is a variant (``Scheduler.shapes`` is then not empty): a config
without either costs one truth test per call, and a body is parsed again only for a
model whose rules apply to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from proxy.calls.context import Fit
from proxy.edge import jsonc
from scheduler.config.policy import GENERATING, Shape, apply
from scheduler.errors import BadRequest


class _Sent(Protocol):
    """What is read of ``upstream.Call`` (which imports this module)."""

    @property
    def path(self) -> str: ...
    @property
    def payload(self) -> Any: ...
    @property
    def body(self) -> bytes | bytearray | None: ...


C = TypeVar("C", bound=_Sent)


def shape_for(shapes: Mapping[str, Shape], asked: str, serving: str) -> Shape | None:
    """The shape of a call for ``asked`` served by model ``serving``: the asked name's
    own (a variant, or a model with a policy), else, for a fallback that serves it,
    the serving model's."""
    shape = shapes.get(asked)
    if shape is not None and shape.model == serving:
        return shape
    shape = shapes.get(serving)
    return shape if shape is not None and shape.label == serving else None


def shaped(call: C, shape: Shape) -> C:
    """``call`` with its JSON body under the shape's rules; as it was for a body that
    generates nothing or is not a JSON object (the upstream answers that one)."""
    rules = shape.rules
    if not rules or call.path not in GENERATING:
        return call
    if call.payload is not None:
        if not isinstance(call.payload, dict):
            return call
        return dataclasses.replace(call, payload=apply(rules, call.payload,  # type: ignore[type-var]
                                                       call.path))
    if not call.body:
        return call
    try:
        body = jsonc.loads(call.body)
    except BadRequest:
        return call
    if not isinstance(body, dict):
        return call
    return dataclasses.replace(call, body=jsonc.dumps(  # type: ignore[type-var]
        apply(rules, body, call.path)))


def refit(fit: Fit | None, call: _Sent) -> Fit | None:
    """The context check of a shaped call: of the body it sends (prompt + the limit
    the upstream receives), not of the one the client asked with."""
    if fit is None or (call.body is fit.body and call.payload is fit.payload):
        return fit
    return dataclasses.replace(fit, body=call.body, payload=call.payload)
