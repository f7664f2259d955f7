"""Which config values are secrets, and keeping them out of what Corral shows.

One rule for every part of the config, present and future: a value is a secret when
its key is named like one (``api_key``, ``api_keys``, ``key``, ``token``,
``secret``, ``password``, ``key_sha256`` is not: a hash is not the key), or when it
is the value of an environment variable named like one (``HF_TOKEN``,
``OPENAI_API_KEY``) in an ``env`` table. ``/admin/config``, ``/admin/config/file``,
``corral check`` and the log scrubber all use it, so a new section that names its
secrets this way (``[[keys]] key``, remotes' ``api_key``, ``[cluster] token``) is
covered without touching them. A ``headers`` table (a remote's, a provider's) is
judged like ``env``: a header named like a credential (``Authorization``,
``X-Api-Key``) holds a secret. ``CorralConfig.credentials()`` adds what a dump cannot
show: upstream keys held as ``SecretStr`` and the values of ``api_key_env``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "<redacted>"
# Config keys whose values are secrets.
_SECRET_KEY = re.compile(r"^(api_keys?|keys?|tokens?|secrets?|passwords?|passkey)$")
# Environment variable names whose values are secrets.
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Request header names whose values are credentials (a remote's ``headers`` table).
SECRET_HEADER = re.compile(r"AUTHORIZATION|KEY|TOKEN|SECRET|PASSWORD|COOKIE", re.IGNORECASE)
# Tables whose entries are judged by their name: a secret-looking name, a secret value.
_NAMED = {"env": SECRET_ENV, "headers": SECRET_HEADER}
# Shorter strings are not scrubbed from text: "a" would eat every log line.
_MIN_SCRUB = 6


def _is_secret_key(name: str, value: Any) -> bool:
    # Only strings (or lists of them) are secrets: ``[[keys]]`` is a list of tables.
    strings = isinstance(value, str) or (
        isinstance(value, list | tuple) and all(isinstance(v, str) for v in value))
    return strings and bool(_SECRET_KEY.match(name))


def redact(data: Any, *, _env: re.Pattern[str] | None = None) -> Any:
    """A copy of ``data`` (a config as plain dicts/lists) with every secret replaced."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            if (_env and _env.search(str(k)) and isinstance(v, str)) or (
                _is_secret_key(str(k), v) and v not in ("", [], ())
            ):
                out[k] = [REDACTED] * len(v) if isinstance(v, list | tuple) else REDACTED
            else:
                out[k] = redact(v, _env=_NAMED.get(str(k)))
        return out
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    return data


def values(data: Any, *, _env: re.Pattern[str] | None = None) -> set[str]:
    """Every secret string in ``data`` (plain dicts/lists)."""
    found: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            secret = (_env and _env.search(str(k))) or _is_secret_key(str(k), v)
            if secret and isinstance(v, str) and v:
                found.add(v)
            elif secret and isinstance(v, list | tuple):
                found.update(x for x in v if isinstance(x, str) and x)
            else:
                found |= values(v, _env=_NAMED.get(str(k)))
    elif isinstance(data, list | tuple):
        for v in data:
            found |= values(v)
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret (longest first) replaced."""
    for s in sorted((s for s in secrets if len(s) >= _MIN_SCRUB), key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


def scrub_data(data: Any, secrets: Iterable[str]) -> Any:
    """``scrub`` over every string of plain dicts/lists."""
    found = tuple(secrets)
    if isinstance(data, str):
        return scrub(data, found)
    if isinstance(data, dict):
        return {k: scrub_data(v, found) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [scrub_data(v, found) for v in data]
    return data


class ScrubFilter(logging.Filter):
    """A last line of defence on the log handlers: a record whose text contains a
    secret of the running config is rewritten. Nothing should log one; this makes sure
    a bug (an upstream's error echoing its key, a URL with a token) does not leak it.

    ``source`` returns the running config (as plain data or a pydantic model); its
    secrets are recomputed only when it returns another object (a reload)."""

    def __init__(self, source: Callable[[], Any]) -> None:
        super().__init__()
        self._source = source
        self._seen: Any = None
        self._secrets: tuple[str, ...] = ()

    def _current(self) -> tuple[str, ...]:
        cfg = self._source()
        if cfg is not self._seen:
            self._seen = cfg
            data = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
            found = values(data)
            if hasattr(cfg, "credentials"):
                # Keys a dump cannot show: SecretStr ones, api_key_env's values.
                found |= cfg.credentials()
            self._secrets = tuple(sorted((v for v in found if len(v) >= _MIN_SCRUB),
                                         key=len, reverse=True))
        return self._secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._current()
        if not secrets:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if any(s in text or (record.exc_text and s in record.exc_text) for s in secrets):
            record.msg, record.args = scrub(text, secrets), None
            if record.exc_text:
                record.exc_text = scrub(record.exc_text, secrets)
        return True
