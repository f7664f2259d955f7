"""Edge guards used on every port: Host check, Origin/content-type check, CORS for
configured origins, dashboard security headers, API keys. See docs/security.md.

Why each exists:

- Host: a web page can rebind its own DNS name to 127.0.0.1 (DNS rebinding) and then
  call Corral "same-origin"; the Host header still names the attacker's domain, so
  only loopback names, the bound host and ``allowed_hosts`` are served.
- Origin and content type: a page may send "simple" cross-origin requests (form
  posts, text/plain fetches) without a CORS preflight. Mutating calls therefore need
  a JSON or multipart body or an API key header (which forces a preflight), and a
  foreign ``Origin`` is refused outright.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
from collections.abc import Awaitable, Callable, Collection
from typing import NamedTuple

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.edge.errors import Dialect, caught, render
from proxy.keys import SCHEDULER
from scheduler.config.root import ServerConfig
from scheduler.errors import CorralError, Unauthorized
from scheduler.keys import tenants

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_WILDCARD_BIND = frozenset({"0.0.0.0", "::", ""})
_DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_ALLOW_HEADERS = "Authorization, Content-Type, X-API-Key, X-Request-Id"
_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


class Forbidden(CorralError):
    status = 403
    code = "forbidden"
    type = "permission_error"


def host_name(host: str) -> str:
    """The name part of a Host header: without the port, brackets kept off."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_matcher(server: ServerConfig) -> Callable[[str], bool]:
    """Whether a Host header value may be served (the port part is ignored)."""
    patterns = [p.strip().lower() for p in server.allowed_hosts if p.strip()]
    bound = host_name(server.host)
    if bound not in _WILDCARD_BIND and not is_loopback(bound):
        patterns.append(bound)
    if "*" in patterns:
        return lambda _host: True
    exact = frozenset(p for p in patterns if "*" not in p)
    globs = [p for p in patterns if "*" in p]

    # Cached: every call asks, with one of a few Host values (parsing an address costs
    # more than the rest of this middleware); bounded, since a client picks the value.
    @functools.lru_cache(maxsize=1024)
    def allowed(host: str) -> bool:
        name = host_name(host)
        if not name:
            return False
        if is_loopback(name) or name in exact:
            return True
        return any(fnmatch.fnmatchcase(name, g) for g in globs)

    return allowed


def origin_host(origin: str) -> str:
    """``http://a.b:8080`` → ``a.b:8080`` (lower case); "" for ``null`` or junk."""
    _, sep, rest = origin.partition("://")
    return rest.split("/", 1)[0].lower() if sep else ""


def _refuse(message: str, dialect: Dialect) -> web.Response:
    return render(Forbidden(message), dialect)


Check = Callable[[web.Request], web.StreamResponse | None]


def host_check(server: ServerConfig, dialect: Dialect) -> Check:
    """The refusal of a call whose Host may not be served; None for one that may."""
    allowed = host_matcher(server)

    def check(request: web.Request) -> web.StreamResponse | None:
        host = request.headers.get("Host", "")
        if allowed(host):
            return None
        if dialect == "ollama":
            return web.Response(status=403, text="403 forbidden: host not allowed")
        return _refuse(
            f"Host {host_name(host)!r} is not allowed; add it to [server] allowed_hosts",
            dialect,
        )

    return check


def _json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def origin_check(server: ServerConfig, dialect: Dialect) -> Check:
    """Main and LM Studio ports: CORS for ``cors_origins``, foreign origins refused,
    mutating calls need a JSON/multipart body or an API key header. The answer to a
    preflight or a refusal; None for a call that goes on."""
    origins = frozenset(o.rstrip("/").lower() for o in server.cors_origins)
    any_origin = "*" in origins

    def listed(origin: str) -> bool:
        return any_origin or origin.rstrip("/").lower() in origins

    def check(request: web.Request) -> web.StreamResponse | None:
        origin = request.headers.get("Origin")
        cors = False
        if origin is not None:
            same = origin_host(origin) == request.headers.get("Host", "").lower()
            if not same:
                if not listed(origin):
                    return _refuse(f"origin {origin!r} is not allowed; see [server] "
                                   "cors_origins", dialect)
                cors = True
        if cors and request.method == "OPTIONS" and (
            "Access-Control-Request-Method" in request.headers
        ):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": str(origin),
                "Access-Control-Allow-Methods": _ALLOW_METHODS,
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        if request.method in _MUTATING and not _may_mutate(request):
            return _refuse(
                "a request that changes something needs a JSON body "
                "(Content-Type: application/json), a multipart form or an API key",
                dialect,
            )
        if cors:
            request[_CORS_ORIGIN] = str(origin)
        return None

    return check


_CORS_ORIGIN = web.RequestKey("corral_cors_origin", str)


def _may_mutate(request: web.Request) -> bool:
    ctype = request.content_type  # "application/octet-stream" when absent
    # application/toml: PUT /admin/config. Like JSON, not a type a page may send
    # cross-origin without a preflight.
    if _json_type(ctype) or ctype in ("multipart/form-data", "application/toml"):
        return True
    if "Authorization" in request.headers or "X-API-Key" in request.headers:
        return True
    # An empty body (curl -X POST): nothing a page could smuggle in it, and browsers
    # send an Origin on every POST, checked above.
    return not request.body_exists or request.content_length == 0


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """CORS and dashboard headers on every prepared response (streams included)."""
    # Only a call with an Origin can have been marked: request.get() of a missing key
    # raises and catches a KeyError, on every response of every call.
    if "Origin" in request.headers:
        origin = request.get(_CORS_ORIGIN)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
    path = request.path
    if path.startswith("/dashboard") and (path == "/dashboard" or path[10] == "/"):
        response.headers.update(_DASHBOARD_HEADERS)


# -- API keys ---------------------------------------------------------------------------


def presented_key(request: web.Request) -> bytes | None:
    """The key the caller sent, as bytes; None when the header is not valid text.

    aiohttp decodes header bytes with surrogateescape: a non-UTF-8 byte becomes a
    lone surrogate, and ``str.encode()`` on it raises (a 500 before this fix).
    """
    given = request.headers.get("X-API-Key", "")
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    try:
        return given.encode("utf-8")
    except UnicodeEncodeError:
        return None


# Paths only an admin key may use (``[[keys]] admin = true``; ``[server] api_keys``
# are admin keys): operations, the config, the metrics that name every key, and
# Ollama's model management (downloads and deletions change the box for everyone),
# the raw passthrough to a model's own server, and Corral's own MCP server (it
# loads, unloads and pins models).
ADMIN_PREFIXES = ("/admin/", "/metrics", "/api/pull", "/api/push", "/api/create",
                  "/api/copy", "/api/delete", "/api/blobs/", "/upstream/", "/mcp")


class OpenRoute(NamedTuple):
    """A route any caller may use without a key, on the one port whose table names it.

    ``path`` is the route as mounted (its canonical form, ``/dashboard/{name}``), so an
    encoded or odd spelling of a path cannot reach another handler as an open one.
    ``method`` GET covers HEAD (the same answer without its body). ``websocket``: open
    only as a websocket upgrade (the LM Studio SDK namespaces check their key in the
    socket's auth packet instead).
    """

    method: str
    path: str
    websocket: bool = False


def is_open(routes: Collection[OpenRoute], method: str, path: str, websocket: bool) -> bool:
    """Whether a call (``method`` on the mounted ``path``; ``websocket``: an upgrade)
    needs no key on a port whose open routes are ``routes``."""
    if websocket and method == "GET" and OpenRoute(method, path, True) in routes:
        return True
    return OpenRoute("GET" if method == "HEAD" else method, path) in routes


def _upgrade(request: web.Request) -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


def _open(request: web.Request, routes: Collection[OpenRoute], paths: frozenset[str]) -> bool:
    # The route the router matched, not the path as sent: a 404 or 405 has no resource
    # and is never open (it answers 401 like any other keyless call).
    resource = request.match_info.route.resource
    if resource is None or resource.canonical not in paths:
        return False  # a call to any other route ends here, after one set lookup
    return is_open(routes, request.method, resource.canonical, _upgrade(request))


def key_check(
    dialect: Dialect, open_routes: Collection[OpenRoute]
) -> Callable[[web.Request], web.StreamResponse | tenants.Key | None]:
    """API keys (``[[keys]]`` and ``[server] api_keys``; scheduler/keys/tenants.py): the
    refusal of a call without a valid key, the key of one with it, None when no key is
    needed (none configured, or an open route).

    Checked on every port whether keys are configured or not, so that a reload that
    adds the first key protects every port at once; without keys it costs one
    attribute read. ``open_routes``: this port's routes that need no key (proxy/app.py
    ``OPEN_ROUTES``; every other method, path and protocol needs one, OPTIONS
    included: a CORS preflight from a listed origin is answered before this, by
    ``origin_check``, and carries no data).
    """

    paths = frozenset(r.path for r in open_routes)

    def check(request: web.Request) -> web.StreamResponse | tenants.Key | None:
        registry = request.app[SCHEDULER].tenants
        if not registry.enabled or _open(request, open_routes, paths):
            return None
        given = presented_key(request)
        # No key at all is never a match, whatever digest is configured.
        key = registry.lookup(given) if given else None
        if key is None:
            return render(
                Unauthorized("a valid API key is required (Authorization: Bearer <key>)"),
                dialect,
            )
        if not key.admin and (request.path.startswith(ADMIN_PREFIXES)
                              or request.path == "/admin"):
            return render(Forbidden(f"key '{key.name}' is not an admin key"), dialect)
        return key

    return check


def edge_middleware(
    server: ServerConfig, dialect: Dialect, open_routes: Collection[OpenRoute]
) -> Middleware:
    """What every request of a port meets before its handler, as one middleware (one
    coroutine a call instead of four): the Host check, then the Origin rules (ports
    other than Ollama's, which has its own), then, within the error rendering
    (``errors.caught``), the API key. A known key is ``tenants.CURRENT`` for the rest
    of the request: the scheduler reads it for scopes and fair queueing,
    proxy.calls.upstream for limits. The Host and Origin refusals are plain answers."""
    host = host_check(server, dialect)
    origin = origin_check(server, dialect) if dialect != "ollama" else None
    keyed = key_check(dialect, open_routes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = host(request)
        if refused is None and origin is not None:
            refused = origin(request)
        if refused is not None:
            return refused
        try:
            key = keyed(request)
            if key is None:
                return await handler(request)
            if not isinstance(key, tenants.Key):
                return key  # refused
            token = tenants.CURRENT.set(key)
            try:
                return await handler(request)
            finally:
                tenants.CURRENT.reset(token)
        except ConnectionResetError:
            raise  # the client went away: nothing to answer
        except Exception as e:
            return caught(request, e, dialect)

    return middleware
