"""How a call leaves Corral for one upstream: what the lease hands the proxy besides
the base URL. Plain data, set by the servable (a remote's table, a runtime's model
name) so the proxy never reads engine config."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Egress:
    # Added to the call's headers (Authorization from the remote's key, its own
    # headers). Never logged: describe() and errors leave them out.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The body's "model" becomes this; None: the body goes byte for byte.
    rename: str | None = None
    # The base URL carries the API's own path ("https://api.openai.com/v1",
    # ".../v1beta/openai"): it replaces the leading /v1 of a routed path.
    api_base: bool = False
    # aiohttp's ssl argument: True (verify), False (tls_verify = false) or a context
    # built once from ca_file.
    ssl: ssl.SSLContext | bool = True
    # Seconds to the first answer byte, over the model's first_byte_timeout.
    first_byte_timeout: float | None = None

    def path(self, path: str) -> str:
        if self.api_base and (path == "/v1" or path.startswith("/v1/")):
            return path[3:]
        return path


PLAIN = Egress()
