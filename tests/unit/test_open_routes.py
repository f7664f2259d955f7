"""Every (port, method, path, protocol) the apps mount, and which of them need no API
key: the list is short, named here and in docs/security.md ("Open routes"). A route
added to any port needs a key unless this list (and proxy/app.py OPEN_ROUTES) says
otherwise on purpose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import OPEN_ROUTES, Port, build_openai_app, port_app
from proxy.edge.guard import is_open
from tests.conftest import make_config

_SDK_NAMESPACES = ("system", "llm", "embedding", "files", "repository", "diagnostics",
                   "plugins", "runtime")


def _both(port: str, path: str) -> set[tuple[str, str, str, str]]:
    return {(port, "GET", path, "http"), (port, "HEAD", path, "http")}


EXPECTED = {
    *_both("main", "/health"), *_both("main", "/"), *_both("main", "/dashboard"),
    *_both("main", "/v1/cluster/auth"),
    *(x for name in ("", "index.html", "app.js", "style.css", "charts.js", "playground.js",
                     "config.js", "models.js", "keys.js", "requests.js", "util.js",
                     "uplot.min.js",
                     "uplot.min.css", "favicon.svg")
      for x in _both("main", f"/dashboard/{name}")),
    *_both("ollama", "/health"), *_both("ollama", "/"),
    *(x for port in ("lmstudio", "lmstudio_sdk") for x in (
        *_both(port, "/health"), *_both(port, "/lmstudio-greeting"),
        *((port, "GET", f"/{ns}", "websocket") for ns in _SDK_NAMESPACES))),
}


def _mounted(app: web.Application) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None}


def _open(port: Port, mounted: set[tuple[str, str]]) -> set[tuple[str, str, str, str]]:
    out = set()
    for method, path in mounted:
        for websocket in (False, True):
            if is_open(OPEN_ROUTES[port], method, path, websocket):
                # Recorded under the weakest protocol that opens it.
                out.add((port, method, path, "websocket" if websocket else "http"))
                break
    return out


async def test_every_mounted_route_needs_a_key_but_the_listed_few(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "a"}], server={"lmstudio_sdk_port": 0})
    core = build_openai_app(cfg)
    await aiohttp_client(core)  # the other ports share the core's scheduler
    apps: dict[Port, web.Application] = {
        "main": core, "ollama": port_app(core, "ollama"),
        "lmstudio": port_app(core, "lmstudio"), "lmstudio_sdk": port_app(core, "lmstudio_sdk"),
    }
    found: set[tuple[str, str, str, str]] = set()
    counts = {}
    for port, app in apps.items():
        mounted = _mounted(app)
        counts[port] = len(mounted)
        found |= _open(port, mounted)
    assert found == EXPECTED
    # The enumeration saw the real surface (a broken walk would "pass" with nothing).
    assert counts["main"] > 60 and counts["ollama"] > 30 and counts["lmstudio"] > 30
    # Every open route is mounted where it is open: no stale entry in OPEN_ROUTES.
    for port, routes in OPEN_ROUTES.items():
        paths = {p for _m, p in _mounted(apps[port])}
        assert {r.path for r in routes} <= paths, port


def test_the_reported_holes_are_closed() -> None:
    main, lms = OPEN_ROUTES["main"], OPEN_ROUTES["lmstudio"]
    # llama-server's native embedding route shares its name with an SDK namespace.
    assert not is_open(main, "POST", "/embedding", False)
    assert not is_open(main, "GET", "/embedding", True)
    assert not is_open(lms, "POST", "/embedding", False)
    assert not is_open(lms, "GET", "/embedding", False)  # plain HTTP, not an upgrade
    assert is_open(lms, "GET", "/embedding", True)
    assert not is_open(lms, "HEAD", "/embedding", True)
    for routes in OPEN_ROUTES.values():
        for method in ("OPTIONS", "POST", "PUT", "DELETE", "PATCH"):
            assert not is_open(routes, method, "/health", False)
            assert not is_open(routes, method, "/health", True)


def test_cluster_routes_need_a_key_or_the_token(tmp_path: Path) -> None:
    """A node's state API and a front's node view are mounted only with [cluster]:
    none of them is open (the node API checks the cluster token itself)."""
    for cluster in ({"role": "node", "token": "t" * 16},
                    {"role": "front", "token": "t" * 16, "nodes": ["http://127.0.0.1:9"]}):
        app = build_openai_app(make_config(tmp_path, [], cluster=cluster))
        mounted = _mounted(app)
        assert any(p.startswith("/corral/") for _m, p in mounted)
        assert _open("main", mounted) == {x for x in EXPECTED if x[0] == "main"}
