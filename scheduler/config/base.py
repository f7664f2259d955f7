"""What every config table shares: the strict base model, the rule for names, sizes.

The lowest of the config modules (``scheduler/config/models.py`` and
``scheduler/config/sections.py`` build on it; ``scheduler/config/root.py`` assembles them).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# A name clients can type in a URL and a JSON string without surprises. ":" is
# allowed so that Ollama-style tags ("gemma3:270m") can be configured verbatim.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "512MiB", "8 GB", "1.5GiB"."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '8GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper().removesuffix("B")
            return int(float(m.group(1)) * _UNITS[unit])
    raise ValueError(f"{value!r} is not a size (use bytes or a string like '8GiB')")
