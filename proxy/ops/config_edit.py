"""Editing the config file from the dashboard: a dry run, errors at their line, a diff.

``POST /admin/config/validate`` takes the edited file (TOML) and answers what
``PUT /admin/config`` would do, without writing or applying anything: the errors
``corral check`` would print (schema, missing files, budgets), the keys an HTTP write
may not change (outside scheduler/config/writable.py's allow-list), each with the line
of the text it points at; which models would be added, removed or restarted; which
``[server]`` keys need a restart; a unified diff against the file on disk.

Secrets: the page only ever sees the file with its secrets redacted
(``GET /admin/config/file``, scheduler/config/secrets.py's rule). ``restore_secrets`` puts
the file's secrets back where the placeholders stand, so an edit that leaves them
alone does not "change" them, and refuses a placeholder anywhere else (which would
copy a secret into a value some other endpoint shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import re
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from proxy.keys import CONFIG
from proxy.ops.reload import RELOADER, NoConfigFile, server_changes
from scheduler.config import secrets

# The same checks as the command line's `corral check` (the CLI imports the web app
# only inside `serve`, so this is no import cycle at load time).
from scheduler.config.checks import check_problems
from scheduler.config.root import CorralConfig, load_config, parse_toml
from scheduler.config.writable import Refusal, moved_models_dir, refused_changes
from scheduler.errors import BadRequest, ConfigError

PLACEHOLDER = secrets.REDACTED
MAX_TEXT = 1 << 20
MAX_ERRORS = 100


# -- secrets ------------------------------------------------------------------------------


def secret_values(text: str, cfg: CorralConfig) -> set[str]:
    """Every secret of the running config and of ``text`` (scheduler/config/secrets.py's rule)."""
    # credentials(): upstream keys a dump shows as ********** and api_key_env values.
    found = secrets.values(cfg.model_dump(mode="json")) | cfg.credentials()
    with contextlib.suppress(ValueError):
        found |= secrets.values(parse_toml(text))
    return found


def redact_text(text: str, cfg: CorralConfig) -> str:
    """The file with every secret (the running config's and the file's own) replaced,
    as ``/admin/config`` does for the parsed view. Replacing the strings themselves
    covers every TOML spelling (inline, multi-line, quoted either way)."""
    for value in sorted(secret_values(text, cfg), key=len, reverse=True):
        text = text.replace(value, PLACEHOLDER)
    return text


def _secret_order(original: str, known: Iterable[str]) -> list[str]:
    """The secrets in the order their placeholders stand in the redacted original."""
    hits: list[tuple[int, int, str]] = []
    for value in sorted({v for v in known if v}, key=len, reverse=True):
        for m in re.finditer(re.escape(value), original):
            if not any(s <= m.start() < e for s, e, _ in hits):
                hits.append((m.start(), m.end(), value))
    return [v for _, _, v in sorted(hits)]


def restore_secrets(text: str, original: str, cfg: CorralConfig) -> str:
    """``text`` with its placeholders replaced by the secrets that stood there in the
    file on disk. Raises BadRequest when that is ambiguous or would put a secret
    anywhere but under a key the secrets rule names."""
    count = text.count(PLACEHOLDER)
    if count == 0:
        return text
    order = _secret_order(original, secret_values(original, cfg))
    if count != len(order):
        raise BadRequest(
            f"the text holds {count} {PLACEHOLDER!r} placeholder(s) but the file on disk "
            f"has {len(order)} secret(s): leave them where they stand, or write the "
            "secrets in the file on disk"
        )
    parts = text.split(PLACEHOLDER)
    out = parts[0] + "".join(v + p for v, p in zip(order, parts[1:], strict=True))
    with contextlib.suppress(ValueError):
        # Redacted by the rule, the data must hold none of them: else one was moved
        # into a value that is shown (a model name, an alias).
        if _holds(secrets.redact(parse_toml(out)), set(order)):
            raise BadRequest(f"{PLACEHOLDER!r} may stand only where a secret stood")
    return out


def _holds(value: object, found: set[str]) -> bool:
    if isinstance(value, str):
        return any(v in value for v in found)
    if isinstance(value, dict):
        return any(_holds(k, found) or _holds(v, found) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds(v, found) for v in value)
    return False


# -- where a problem is -------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)")
_MODEL = re.compile(r"^model '((?:[^'\\]|\\.)*)': ")
_MODEL_INDEX = re.compile(r"^models\[(\d+)\]: ")


def _blocks(lines: list[str]) -> list[tuple[str, int, int]]:
    """(table name, first line index, end index) per table; "" for the top level.
    An array of tables ([[models]]) gives one block per entry."""
    out: list[tuple[str, int, int]] = []
    name, start = "", 0
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            out.append((name, start, i))
            name, start = m.group(2).strip().replace(" ", ""), i
    out.append((name, start, len(lines)))
    return out


def _key_line(lines: list[str], start: int, end: int, key: str) -> int | None:
    """Line index of ``key = ...`` (or its first dotted part) inside a block."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        dotted = r"\s*\.\s*".join(rf"[\"']?{re.escape(p)}[\"']?" for p in parts[:n])
        rx = re.compile(rf"^\s*{dotted}\s*[=.]")
        for i in range(start, end):
            if rx.match(lines[i]):
                return i
    return None


def locate(text: str, problem: str, path: Path | str | None = None) -> int | None:
    """The 1-based line of ``text`` a problem message points at, when it can be told.

    Messages look like ``corral check``'s (refused keys are phrased the same):
    ``<file>: [model 'name': ]<key>: <what>`` or
    ``<file>: invalid TOML: ... (at line N, column M)``.
    """
    rest = problem
    if path is not None:
        prefix = f"{path}: "
        if not rest.startswith(prefix):
            return None  # another file (models.d) or the environment
        rest = rest[len(prefix):]
    m = _TOML_AT.search(rest)
    if m:
        return int(m.group(1))
    lines = text.splitlines()
    blocks = _blocks(lines)
    models = [(s, e) for name, s, e in blocks if name == "models"]
    model_block: tuple[int, int] | None = None
    mm, mi = _MODEL.match(rest), _MODEL_INDEX.match(rest)
    if mm:
        rest = rest[mm.end():]
        model_block = _named(lines, models, mm.group(1))
        if model_block is None:
            return None
    elif mi:
        rest = rest[mi.end():]
        index = int(mi.group(1))
        if index >= len(models):
            return None
        model_block = models[index]
    key = rest.split(": ", 1)[0].strip()
    if model_block is not None:
        start, end = model_block
        if key == "(top level)":
            return start + 1
        found = _key_line(lines, start, end, key)
        return (found if found is not None else start) + 1
    if key == "(top level)" or " " in key:
        return None
    section, _, sub = key.partition(".")
    for name, start, end in blocks:
        if name == section and sub:
            found = _key_line(lines, start, end, sub)
            return (found if found is not None else start) + 1
    top = blocks[0]
    found = _key_line(lines, top[1], top[2], key)
    return found + 1 if found is not None else None


def _named(lines: list[str], models: list[tuple[int, int]], name: str) -> tuple[int, int] | None:
    rx = re.compile(r"^\s*name\s*=\s*[\"']" + re.escape(name) + r"[\"']")
    for start, end in models:
        if any(rx.match(lines[i]) for i in range(start, end)):
            return start, end
    return None


def _refused_message(path: Path, refusal: Refusal) -> str:
    # Phrased like a check problem so that locate() finds the line.
    section, *rest = refusal.key
    if section == "models" and len(rest) > 1:
        where = f"model {rest[0]!r}: {'.'.join(rest[1:])}"
    else:
        where = refusal.dotted
    return (f"{path}: {where}: refused over HTTP ({refusal.why}): changes only in the file "
            "on disk")


# -- the dry run ----------------------------------------------------------------------------


def model_changes(old: CorralConfig, new: CorralConfig) -> dict[str, list[str]]:
    """Which configured models a switch to ``new`` would add, remove and restart
    ("changed"), named as the reload's outcome names them."""
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    return {
        "added": [n for n in after if n not in before],
        "removed": [n for n in before if n not in after],
        "changed": [n for n in after if n in before and after[n] != before[n]],
        "unchanged": [n for n in after if n in before and after[n] == before[n]],
    }


def _scrub(message: str, text: str, cfg: CorralConfig) -> str:
    for value in sorted(secret_values(text, cfg), key=len, reverse=True):
        message = message.replace(value, PLACEHOLDER)
    return message


def _checked_view(current: CorralConfig, new: CorralConfig,
                  refused: list[Refusal]) -> CorralConfig:
    """``new`` without what the write would refuse, so that the checks look only at
    files and programs the running config already names: a dry run reads, runs and
    fetches nothing the edit names (a refused model is reported as refused instead)."""
    models = {r.key[1] for r in refused if r.key[0] == "models" and len(r.key) > 1}
    sections = {r.key[0] for r in refused}
    update: dict[str, object] = {
        "models": tuple(m for m in new.models if m.name not in models)}
    for section in ("llama_server", "runtimes", "providers"):
        if section in sections:
            update[section] = getattr(current, section)
    return new.model_copy(update=update)


def dry_run(path: Path, text: str, original: str, current: CorralConfig) -> dict[str, object]:
    """What writing ``text`` to ``path`` would do. Blocking (reads files, probes
    memory): call through ``asyncio.to_thread``."""
    problems: list[str] = []
    changes: dict[str, list[str]] = {}
    restart: list[str] = []
    moved = moved_models_dir(path, text, current)
    if moved is not None:
        problems = [_refused_message(path, moved)]
    else:
        try:
            new = load_config(path, text=text)
        except ConfigError as e:
            problems = [p for p in e.message.splitlines() if p.strip()]
        else:
            refused = refused_changes(current, new)
            problems = check_problems(path, _checked_view(current, new, refused))
            problems += [_refused_message(path, r) for r in refused]
            changes = model_changes(current, new)
            restart = server_changes(current, new)
    if len(problems) > MAX_ERRORS:
        # Each is located by a scan of the text: a body of thousands of bad tables
        # must not cost thousands of scans.
        problems = [*problems[:MAX_ERRORS],
                    f"{path}: {len(problems) - MAX_ERRORS} more problems not shown"]
    diff = "".join(difflib.unified_diff(
        redact_text(original, current).splitlines(keepends=True),
        redact_text(text, current).splitlines(keepends=True),
        fromfile=f"{path.name} (running)", tofile=f"{path.name} (edited)"))
    return {
        "ok": not problems,
        "errors": [{"line": locate(text, p, path), "message": _scrub(p, text, current)}
                   for p in problems],
        "changes": changes,
        "restart_required": restart,
        "diff": diff,
    }


async def read_original(path: Path) -> str:
    try:
        return await asyncio.to_thread(path.read_text, encoding="utf-8")
    except FileNotFoundError:
        return ""


async def edited_text(request: web.Request) -> tuple[Path, str, str]:
    """The config file's path, the body with the running secrets restored, and the
    file on disk as it is."""
    reloader = request.app[RELOADER]
    if reloader.path is None:
        raise NoConfigFile("Corral was started without a config file to edit")
    if (request.content_length or 0) > MAX_TEXT:
        raise BadRequest(f"a config file over {MAX_TEXT} bytes is not accepted")
    raw = bytearray()
    async for chunk in request.content.iter_any():
        raw += chunk
        if len(raw) > MAX_TEXT:  # a chunked body declares no length
            raise BadRequest(f"a config file over {MAX_TEXT} bytes is not accepted")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the config file must be UTF-8 text (byte {e.start} is not)") from None
    if not text.strip():
        raise BadRequest("the body must be the new config file (TOML)")
    original = await read_original(reloader.path)
    return reloader.path, restore_secrets(text, original, reloader.current), original


async def validate(request: web.Request) -> web.Response:
    """POST /admin/config/validate: a dry run of PUT /admin/config (200 either way;
    ``ok`` tells)."""
    path, text, original = await edited_text(request)
    current = request.app[RELOADER].current
    report = await asyncio.to_thread(dry_run, path, text, original, current)
    # The listeners' setting, as PUT checks it: the page greys out Apply without it.
    report["writable"] = request.app[CONFIG].server.admin_config_write
    return web.json_response(report)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/config/validate", validate)
