"""Where Corral's credentials are and how output is cleaned of them: ``/admin/config``,
the config file it serves, `corral check`. Keys reach upstreams only through a
servable's ``Egress`` headers; everything shown to people goes through ``scrub``."""

from __future__ import annotations

from scheduler.config import CorralConfig
from scheduler.engines.settings import secret_header, secrets_of


def config_secrets(cfg: CorralConfig) -> set[str]:
    """Every credential a config holds or names, resolved (api_key, the value of
    api_key_env, credential headers) across remotes and providers, plus the server's
    own api_keys: what /admin, `corral check` and errors must never show."""
    remotes = [rc for m in cfg.models for rc in m.remote_configs()]
    return {*cfg.server.api_keys, *secrets_of(remotes, cfg.providers)}


def file_secrets(data: object) -> set[str]:
    """Credentials written in a parsed config file, wherever they sit (a file that
    differs from the running config, or that does not validate)."""
    out: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("api_key", "api_keys") and isinstance(value, str | list):
                out.update(v for v in ([value] if isinstance(value, str) else value)
                           if isinstance(v, str) and v)
            elif key == "headers" and isinstance(value, dict):
                out.update(v for k, v in value.items()
                           if isinstance(v, str) and v and secret_header(str(k)))
            else:
                out |= file_secrets(value)
    elif isinstance(data, list):
        for item in data:
            out |= file_secrets(item)
    return out


def scrub(data: object, secrets: set[str], mask: str = "<redacted>") -> object:
    """``data`` (a JSON-like dump or a string) with every secret replaced."""
    if isinstance(data, str):
        for s in sorted(secrets, key=len, reverse=True):
            data = data.replace(s, mask)
        return data
    if isinstance(data, dict):
        return {k: scrub(v, secrets, mask) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub(v, secrets, mask) for v in data]
    return data
