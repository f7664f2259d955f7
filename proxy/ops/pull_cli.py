"""`corral pull NAME` and the scan report of `corral check`.

``pull`` asks the running Corral (its Ollama port's ``/api/pull``) so that the model
is served at once, and draws the status lines as a progress bar; with no Corral
running it downloads into the same cache itself.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from scheduler.config.root import CorralConfig

_BAR = 30


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def render(line: dict[str, Any]) -> str:
    """One status line as the CLI shows it: a bar for the ones with a total."""
    if "error" in line:
        return f"error: {line['error']}"
    status = str(line.get("status", ""))
    total, done = line.get("total"), line.get("completed")
    if not isinstance(total, int) or not isinstance(done, int) or total <= 0:
        return status
    frac = min(1.0, done / total)
    fill = round(frac * _BAR)
    return (f"{status} {frac * 100:3.0f}% |{'█' * fill}{' ' * (_BAR - fill)}| "
            f"{_mb(done)}/{_mb(total)}")


def draw(lines: Iterable[dict[str, Any]], out: TextIO) -> bool:
    """Draw the lines; True when the pull ended in success."""
    tty = out.isatty()
    last_status, ok, open_bar = "", False, False
    for line in lines:
        text = render(line)
        if "total" in line and tty:
            out.write("\r" + text)
            open_bar = True
        elif "total" in line and line.get("status") == last_status and (
            line.get("completed") != line.get("total")
        ):
            continue  # not a terminal: one line per file, when it starts and ends
        else:
            out.write(("\n" if open_bar else "") + text + "\n")
            open_bar = False
        out.flush()
        last_status = str(line.get("status"))
        ok = line.get("status") == "success"
        if "error" in line:
            return False
    if open_bar:
        out.write("\n")
    return ok


def _remote_lines(url: str, name: str, key: str | None) -> Iterator[dict[str, Any]]:
    req = urllib.request.Request(
        url.rstrip("/") + "/api/pull", data=json.dumps({"model": name}).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=3600)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            yield {"error": json.loads(body).get("error", body)}
        except (ValueError, AttributeError):
            yield {"error": f"HTTP {e.code}: {body}"}
        return
    with resp:
        try:
            for raw in resp:
                if raw.strip():
                    yield json.loads(raw)
        except (OSError, http.client.HTTPException, ValueError) as e:
            yield {"error": f"the answer from Corral broke off: {e}"}


def _local_lines(cfg: CorralConfig, name: str) -> Iterator[dict[str, Any]]:
    from scheduler.errors import CorralError
    from scheduler.models import pull

    model = next((m for m in cfg.models if name in (m.name, *m.aliases)), None)
    make: Callable[[], pull.Plan]
    if model is not None and model.hf_repo and model.hf_file:
        repo, file, rev, mm = model.hf_repo, model.hf_file, model.hf_revision, model.mmproj
        make = lambda: pull.plan(repo, None, revision=rev, hf_file=file, mmproj=mm)  # noqa: E731
    elif (ref := pull.parse_ref(name)) is not None:
        make = lambda: pull.plan(ref.repo, ref.tag)  # noqa: E731
    else:
        yield {"error": f"{name!r} is neither hf.co/{{user}}/{{repo}}[:quant] nor a "
                        "configured hf_repo model"}
        return
    # No server to stream to: drive the pull's steps one by one on a loop of our own,
    # so that each status line is drawn as it happens.
    loop = asyncio.new_event_loop()
    steps = pull.steps(make)
    try:
        while True:
            try:
                item = loop.run_until_complete(anext(steps))
            except StopAsyncIteration:
                break
            except CorralError as e:
                yield {"error": e.message}
                break
            if isinstance(item, dict):
                yield item
    finally:
        loop.run_until_complete(steps.aclose())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def cmd_pull(args: argparse.Namespace, cfg: CorralConfig) -> int:
    server = cfg.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    url = args.url or f"http://{host}:{server.ollama_port}"
    key = server.api_keys[0] if server.api_keys else None
    try:
        ok = draw(_remote_lines(url, args.name, key), sys.stderr)
    except urllib.error.URLError:
        print(f"corral: no Corral answers at {url}; downloading into the cache here "
              "(a running Corral serves it on first use with auto_pull, or when the "
              "cache is scanned)", file=sys.stderr)
        ok = draw(_local_lines(cfg, args.name), sys.stderr)
    return 0 if ok else 1


def scan_report(cfg: CorralConfig, out: TextIO) -> None:
    """What `corral check` says about the scanned directories."""
    from scheduler.discovery.scanner import HeaderCache, scan

    dirs = cfg.scan_dirs()
    if not dirs:
        return
    result = scan(dirs, HeaderCache())
    names = ", ".join(m.name for m in result.models) or "none"
    print(f"scan: {len(result.models)} model(s) found: {names}", file=out)
    for p in result.problems:
        print(f"scan: {p}", file=out)
