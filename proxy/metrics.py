"""Prometheus metrics: one registry per core app, the request middleware, ``/metrics``.

Three sources, three costs (docs/metrics.md lists every series):

* **Per call** (the request middleware, on the hot path): calls by model, dialect,
  endpoint and status; duration; time to first byte of streamed answers. Budget: a
  few µs. No regex, no JSON, no label strings built per call: plain counters in a
  dict keyed by a small tuple, turned into families at scrape time. The labels are
  bounded by construction (``model`` is a configured name or "", ``endpoint`` a
  route template, ``status`` an HTTP status).
* **Scheduler events** (this class implements ``scheduler.Events``): launches,
  stops by reason, evictions, crashes, load duration, queue wait.
* **At scrape time** (a custom collector, nothing kept per call): queue depth,
  instances by state, in-flight and slots per instance, memory, and each
  instance's own llama-server ``/metrics`` re-labelled as ``corral_llamacpp_*``.
  Prompt and completion token totals per model are derived from those llama-server
  counters instead of parsing every answer body on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence

import aiohttp
import psutil
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.reqlog import CURRENT, HEADER, RequestIds, RequestInfo
from scheduler.instance import Instance, State
from scheduler.scheduler import Scheduler
from scheduler.tenants import Tenants

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The text format Prometheus 2.x parses; prometheus_client's own CONTENT_TYPE_LATEST
# moved to version 1.0.0, which older scrapers do not announce they accept.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Set by the OpenAI relay on every answer: the configured name of the model that
# served the call (a fallback's name when a fallback did).
MODEL_HEADER = "X-Corral-Model"
# Endpoints kept out of the recent-requests ring: the dashboard polls them every
# second and would push every real call out.
_QUIET_PREFIXES = ("/admin", "/metrics", "/dashboard", "/health")
# How long a scrape waits for an instance's own /metrics before going without it.
UPSTREAM_TIMEOUT = 1.0
# Instance states whose llama-server answers HTTP.
_SERVING = frozenset({State.READY, State.DRAINING})

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Model states as scheduler.model_status() names them.
MODEL_STATES = ("loaded", "loading", "not-loaded", "failed", "unavailable")


# time, method, dialect, model, endpoint, status, duration, request id: a tuple, because
# building an object per call costs more than everything else the ring does.
Recent = tuple[float, str, str, str, str, int, float, str]


def _recent_dict(r: Recent) -> dict[str, object]:
    return {"time": round(r[0], 3), "method": r[1], "dialect": r[2], "model": r[3],
            "endpoint": r[4], "status": r[5], "duration_seconds": round(r[6], 4),
            "request_id": r[7]}


class CallStats:
    """Count, duration and time-to-first-byte histograms of the calls with one label set.

    Plain ints and floats instead of prometheus_client children: every call is
    recorded on the event loop thread, so the library's per-observation lock (2-3 µs
    for a histogram) buys nothing on the hot path. Exposed by the collector.
    """

    __slots__ = ("count", "dur", "dur_sum", "ttft", "ttft_count", "ttft_sum")

    def __init__(self) -> None:
        self.count = 0
        self.dur = [0] * (len(_DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.dur_sum = 0.0
        self.ttft = [0] * (len(_TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_count = 0


class Metrics:
    """Every metric of one Corral process, in its own registry, and the Events sink.

    Built with the core app (the middlewares need it before startup); bound to the
    scheduler and the upstream session once the core's cleanup_ctx has made them.
    """

    def __init__(self, recent_requests: int = 200, recent_events: int = 100) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.queue_wait = Histogram(
            "corral_queue_wait_seconds", "Time a queued call waited for a slot, by outcome "
            "(granted, timeout, full, cancelled, failed). Calls served at once never queue.",
            ["model", "outcome"], buckets=_WAIT_BUCKETS, registry=r)
        self.launches = Counter(
            "corral_instance_launches", "llama-server launches, by result (ok, failed).",
            ["model", "result"], registry=r)
        self.load_duration = Histogram(
            "corral_instance_load_duration_seconds", "Time from launch to a ready /health.",
            ["model"], buckets=_LOAD_BUCKETS, registry=r)
        self.stops = Counter(
            "corral_instance_stops", "Instances told to stop, by reason (idle, evicted, "
            "preempted, unload, shutdown, config, reload, removed).", ["model", "reason"],
            registry=r)
        self.evictions = Counter(
            "corral_evictions", "Instances stopped to make room for another model "
            "(reasons evicted and preempted).", ["model"], registry=r)
        self.crashes = Counter(
            "corral_instance_crashes", "Ready instances whose process exited unasked.",
            ["model"], registry=r)
        self.accept_errors = Counter(
            "corral_accept_errors", "Connections not accepted for lack of file descriptors "
            "(EMFILE, ENFILE).", registry=r)
        self.listener_events = Counter(
            "corral_listener_events", "Connections refused over a cap (refused) and requests "
            "cut for a slow head or body (head_timeout, body_timeout), per port.",
            ["port", "event"], registry=r)
        self.reload_success = Gauge(
            "corral_config_reload_success", "1 if the last config reload worked, else 0.",
            registry=r)
        self.reload_time = Gauge(
            "corral_config_last_reload_timestamp_seconds",
            "Unix time of the last successful config load (start-up counts).", registry=r)
        self.reloads = Counter(
            "corral_config_reloads", "Config reload attempts, by result (ok, error).",
            ["result"], registry=r)
        build = Gauge("corral_build_info", "Corral's version.", ["version"], registry=r)
        build.labels(__version__).set(1)
        self.reload_success.set(1)
        self.reload_time.set(time.time())
        for result in ("ok", "error"):
            self.reloads.labels(result)

        self.ids = RequestIds()
        self.recent: deque[Recent] = deque(maxlen=recent_requests)
        self.events: deque[dict[str, object]] = deque(maxlen=recent_events)
        self.upstream = UpstreamMetrics()
        self.memory: dict[str, int] = {}  # instance id -> resident bytes, at last refresh
        self._scheduler: Scheduler | None = None
        self._session: aiohttp.ClientSession | None = None
        self._models: frozenset[str] = frozenset()
        # (model, dialect, endpoint, status) -> stats; bounded like the labels are.
        self.calls: dict[tuple[str, str, str, int], CallStats] = {}
        r.register(_SchedulerCollector(self))

    # -- wiring ------------------------------------------------------------------

    def bind(self, scheduler: Scheduler, session: aiohttp.ClientSession) -> None:
        self._scheduler = scheduler
        self._session = session
        self.set_models(m.name for m in scheduler.config.models)

    def set_models(self, names: Iterable[str]) -> None:
        """The configured model names: the only values the ``model`` label takes."""
        self._models = frozenset(names)
        for name in self._models:
            # Present at 0 from the start, so rate() and increase() see the first call.
            self.launches.labels(name, "ok")
            self.crashes.labels(name)
            self.evictions.labels(name)
            self.upstream.prompt_tokens.setdefault(name, 0.0)
            self.upstream.completion_tokens.setdefault(name, 0.0)

    def config_loaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "error").inc()
        self.reload_success.set(1 if ok else 0)
        if ok:
            self.reload_time.set(time.time())

    # -- per call ----------------------------------------------------------------

    def record(self, request: web.Request, info: RequestInfo, dialect: str, status: int,
               elapsed: float, resp: web.StreamResponse | None) -> None:
        model = info.model
        if not model and resp is not None:
            model = resp.headers.get(MODEL_HEADER, "")
        if model not in self._models:
            model = ""
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "other"
        key = (model, dialect, endpoint, status)
        st = self.calls.get(key)
        if st is None:
            st = self.calls[key] = CallStats()
        st.count += 1
        st.dur[bisect_left(_DURATION_BUCKETS, elapsed)] += 1
        st.dur_sum += elapsed
        if info.first_byte:
            ttft = info.first_byte - info.start
            st.ttft[bisect_left(_TTFT_BUCKETS, ttft)] += 1
            st.ttft_sum += ttft
            st.ttft_count += 1
        if endpoint != "/" and not endpoint.startswith(_QUIET_PREFIXES):
            self.recent.append((time.time(), request.method, dialect, model, endpoint, status,
                                elapsed, info.id))

    def recent_requests(self, limit: int) -> list[dict[str, object]]:
        """The last ``limit`` calls, newest first."""
        if limit <= 0:
            return []
        return [_recent_dict(r) for r in reversed(list(self.recent)[-limit:])]

    # -- scheduler.Events ----------------------------------------------------------

    def launched(self, model: str, seconds: float, ok: bool) -> None:
        self.launches.labels(model, "ok" if ok else "failed").inc()
        if ok:
            self.load_duration.labels(model).observe(seconds)
        self._event("launched" if ok else "launch-failed", model, round(seconds, 3))

    def stopped(self, model: str, reason: str) -> None:
        self.stops.labels(model, reason).inc()
        if reason in ("evicted", "preempted"):
            self.evictions.labels(model).inc()
        self._event("stopped", model, reason)

    def crashed(self, model: str) -> None:
        self.crashes.labels(model).inc()
        self._event("crashed", model, None)

    def waited(self, model: str, seconds: float, outcome: str) -> None:
        self.queue_wait.labels(model, outcome).observe(seconds)

    def _event(self, kind: str, model: str, detail: object) -> None:
        self.events.append({"time": round(time.time(), 3), "event": kind, "model": model,
                            "detail": detail})

    # -- scrape time ---------------------------------------------------------------

    async def refresh(self, *, only_active: bool = False) -> None:
        """Fetch what the collector reports but cannot read synchronously: each
        instance's llama-server metrics and resident memory."""
        if self._scheduler is None or self._session is None:
            return
        instances = self._scheduler.instances()
        await self.upstream.refresh(self._session, instances, only_active=only_active)
        if not only_active:
            pids = {i.id: i.pid for i in instances if i.pid is not None}
            self.memory = await asyncio.to_thread(resident_memory, pids)

    def exposition(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry minus prometheus_client's ``*_created`` samples, which the text
    format turns into one extra gauge per counter and histogram child. Done here, per
    scrape, because the library's switch for it is process-global."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


def resident_memory(pids: dict[str, int]) -> dict[str, int]:
    """Resident bytes per instance id. Blocking (reads /proc): call via to_thread."""
    out = {}
    for iid, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            out[iid] = int(psutil.Process(pid).memory_info().rss)
    return out


# -- the request middleware ---------------------------------------------------------


def request_middleware(metrics: Metrics, dialect: str) -> Middleware:
    """Outermost middleware: request id, call metrics, the recent-requests ring.

    Sees the final status (after error rendering and auth). Keep it cheap: it runs
    on every call of every port, and the main port's budget is a few µs per call.
    """
    ids = metrics.ids
    record = metrics.record
    clock = time.perf_counter

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = clock()
        info = RequestInfo(ids.accept(request.headers.get(HEADER)), start)
        request[REQUEST_INFO] = info
        token = CURRENT.set(info)
        status = 500
        resp: web.StreamResponse | None = None
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away (nginx's code for it), unless it had the whole answer.
            status = info.status if info.ended and info.status else 499
            raise
        finally:
            CURRENT.reset(token)
            record(request, info, dialect, status, clock() - start, resp)

    return middleware


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Stamp the request id on every response just before its headers go out, and
    time the first body byte of streamed ones.

    Done here rather than in the middleware because a stream is sent from inside the
    handler, and a middleware placed outside ours may answer with a response of its
    own: both are prepared where only this hook sees them.
    """
    info = request.get(REQUEST_INFO)
    if info is None:
        return
    response.headers[HEADER] = info.id
    info.status = response.status
    if type(response) is web.StreamResponse:
        _time_first_write(response, info)


def _time_first_write(response: web.StreamResponse, info: RequestInfo) -> None:
    # A wrapper on this one response, removed by its first call: the later chunks of
    # a stream go straight to aiohttp and cost nothing extra.
    write = response.write

    async def first_write(data: bytes | bytearray | memoryview) -> None:
        info.first_byte = time.perf_counter()
        del response.write
        await write(data)

    response.write = first_write  # type: ignore[method-assign]


def install(app: web.Application) -> None:
    """Per-app wiring the middleware cannot do alone (every port's app calls it)."""
    app.on_response_prepare.append(on_response_prepare)


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    await metrics.refresh()
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


def metrics_ctx(
    metrics: Metrics, poll_interval: float = 2.0
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """Binds the metrics to the core's scheduler and runs the upstream poller.

    Goes after the core's cleanup_ctx (it needs the scheduler) and so stops first.
    """

    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from proxy.keys import SCHEDULER, SESSION

        metrics.bind(app[SCHEDULER], app[SESSION])
        poller = asyncio.create_task(_poll_upstreams(metrics, poll_interval),
                                     name="corral-metrics-poller")
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    return ctx


async def _poll_upstreams(metrics: Metrics, interval: float) -> None:
    # Token totals come from llama-server's counters, which die with the process:
    # reading the instances that served calls since the last read keeps what an
    # instance counted before it is stopped, even when nobody scrapes for a while.
    while True:
        await asyncio.sleep(interval)
        try:
            await metrics.refresh(only_active=True)
        except Exception:  # a poller that dies silently loses every later token
            log.exception("reading llama-server metrics failed")


# -- llama-server's own metrics -------------------------------------------------------


def corral_name(upstream: str) -> str:
    """``llamacpp:tokens_predicted_total`` -> ``corral_llamacpp_tokens_predicted_total``"""
    return "corral_" + upstream.replace(":", "_")


class UpstreamMetrics:
    """The last /metrics of every serving instance, re-labelled, and the prompt and
    completion token totals per model accumulated from their counters.

    A total only grows: each read adds what an instance's counter gained since the
    previous read (all of it on the first read of an instance, which counted from 0).
    """

    PROMPT = "llamacpp:prompt_tokens_total"
    COMPLETION = "llamacpp:tokens_predicted_total"

    def __init__(self) -> None:
        self.latest: dict[str, list[Metric]] = {}
        self.prompt_tokens: dict[str, float] = defaultdict(float)
        self.completion_tokens: dict[str, float] = defaultdict(float)
        self._seen: dict[str, tuple[float, float]] = {}
        self._served: dict[str, int] = {}
        # Two reads of one instance applied out of order would count a "reset".
        self._lock = asyncio.Lock()

    async def refresh(self, session: aiohttp.ClientSession, instances: Sequence[Instance], *,
                      only_active: bool = False, within: float = UPSTREAM_TIMEOUT) -> None:
        async with self._lock:
            targets = [i for i in instances if i.state in _SERVING and i.base_url]
            if only_active:
                targets = [i for i in targets
                           if i.in_flight or self._served.get(i.id) != i.stats.served]
            served = [i.stats.served for i in targets]
            texts = await asyncio.gather(*(_fetch(session, i, within) for i in targets))
            for inst, text, n in zip(targets, texts, served, strict=True):
                if text is not None and self.ingest(inst.id, inst.model, text):
                    self._served[inst.id] = n
            live = {i.id for i in instances}
            for table in (self.latest, self._seen, self._served):
                for iid in [k for k in table if k not in live]:
                    del table[iid]

    def ingest(self, instance_id: str, model: str, text: str) -> bool:
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as e:
            log.debug("instance %s: unreadable /metrics: %s", instance_id, e)
            return False
        out = []
        prompt = completion = 0.0
        for fam in families:
            m = Metric(corral_name(fam.name), fam.documentation, fam.type)
            for s in fam.samples:
                m.add_sample(corral_name(s.name),
                             {**s.labels, "model": model, "instance_id": instance_id},
                             s.value, s.timestamp)
                if s.name == self.PROMPT:
                    prompt = s.value
                elif s.name == self.COMPLETION:
                    completion = s.value
            out.append(m)
        self.latest[instance_id] = out
        last_p, last_c = self._seen.get(instance_id, (0.0, 0.0))
        self.prompt_tokens[model] += prompt - last_p if prompt >= last_p else prompt
        self.completion_tokens[model] += completion - last_c if completion >= last_c else completion
        self._seen[instance_id] = (prompt, completion)
        return True

    def families(self) -> Iterator[Metric]:
        """One family per name, with the samples of every instance."""
        merged: dict[str, Metric] = {}
        for fams in self.latest.values():
            for fam in fams:
                into = merged.get(fam.name)
                if into is None:
                    into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                into.samples.extend(fam.samples)
        yield from merged.values()


async def _fetch(session: aiohttp.ClientSession, inst: Instance, within: float) -> str | None:
    try:
        async with session.get(inst.base_url + "/metrics",
                               timeout=aiohttp.ClientTimeout(total=within)) as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except (aiohttp.ClientError, TimeoutError) as e:
        log.debug("instance %s: /metrics unavailable: %s", inst.id, e)
        return None


# -- scrape-time collector ---------------------------------------------------------------


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler when Prometheus scrapes, not kept per call."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # names are dynamic (llama-server's); skip the duplicate check

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        yield from _call_families(m.calls)
        if m._scheduler is None:
            return
        status = m._scheduler.model_status()
        model_state = GaugeMetricFamily(
            "corral_model_state", "1 for the state each configured model is in.",
            labels=["model", "state"])
        queue = GaugeMetricFamily(
            "corral_queue_depth", "Calls waiting for a slot.", labels=["model"])
        footprint = GaugeMetricFamily(
            "corral_model_footprint_bytes", "Memory one instance of the model is expected "
            "to use (configured or estimated from the GGUF file).", labels=["model"])
        by_state = GaugeMetricFamily(
            "corral_instances", "llama-server instances by state.", labels=["model", "state"])
        for ms in status:
            name = str(ms["name"])
            for st in MODEL_STATES:
                model_state.add_metric([name, st], 1.0 if ms["state"] == st else 0.0)
            queue.add_metric([name], _num(ms.get("queued")))
            footprint.add_metric([name], _num(ms.get("footprint_bytes")))
        counts: dict[tuple[str, str], int] = {
            (str(ms["name"]), str(st)): 0 for ms in status for st in State
        }
        in_flight = GaugeMetricFamily(
            "corral_instance_in_flight", "Calls an instance is serving.",
            labels=["model", "instance_id"])
        slots = GaugeMetricFamily(
            "corral_instance_slots", "Parallel slots of an instance (llama-server --parallel).",
            labels=["model", "instance_id"])
        served = CounterMetricFamily(
            "corral_instance_served", "Calls an instance has served since it started.",
            labels=["model", "instance_id"])
        rss = GaugeMetricFamily(
            "corral_instance_resident_memory_bytes", "Resident memory of an instance's "
            "llama-server process.", labels=["model", "instance_id"])
        for inst in m._scheduler.instances():
            counts[(inst.model, str(inst.state))] = counts.get((inst.model, str(inst.state)),
                                                               0) + 1
            labels = [inst.model, inst.id]
            in_flight.add_metric(labels, float(inst.in_flight))
            slots.add_metric(labels, float(inst.slots))
            served.add_metric(labels, float(inst.stats.served))
            if inst.id in m.memory:
                rss.add_metric(labels, float(m.memory[inst.id]))
        for (model, st), n in counts.items():
            by_state.add_metric([model, st], float(n))
        prompt = CounterMetricFamily(
            "corral_prompt_tokens", "Prompt tokens evaluated by llama-server (cached "
            "prefix tokens excluded), from each instance's own counters.", labels=["model"])
        completion = CounterMetricFamily(
            "corral_completion_tokens", "Tokens generated by llama-server, from each "
            "instance's own counters.", labels=["model"])
        for name, v in m.upstream.prompt_tokens.items():
            prompt.add_metric([name], v)
        for name, v in m.upstream.completion_tokens.items():
            completion.add_metric([name], v)
        yield from (model_state, queue, footprint, by_state, in_flight, slots, served, rss,
                    prompt, completion)
        yield from m.upstream.families()
        yield from _key_families(m._scheduler.tenants)
        saver = m._scheduler.slots
        cache = CounterMetricFamily(
            "corral_slot_cache", "Slot cache actions: saves and restores of conversations' "
            "llama-server slots, and failures (which cost only the cache).", labels=["action"])
        for action, n in (("saved", saver.saved), ("restored", saver.restored),
                          ("failed", saver.failed)):
            cache.add_metric([action], float(n))
        yield cache
        yield from _engine_families(m._scheduler)


def _engine_families(scheduler: Scheduler) -> Iterator[Metric]:
    """Remotes and providers (docs/engines.md): in rotation or not, models listed."""
    remote_up = GaugeMetricFamily(
        "corral_remote_up", "1 while a remote upstream is in rotation (answering, not "
        "cooling down).", labels=["model", "remote"])
    for r in scheduler.remotes():
        remote_up.add_metric([r.model, r.id], 1.0 if r.state is State.READY else 0.0)
    provider_up = GaugeMetricFamily(
        "corral_provider_up", "1 while a provider's last listing succeeded.",
        labels=["provider"])
    provider_models = GaugeMetricFamily(
        "corral_provider_models", "Models a provider offers (its last known list).",
        labels=["provider"])
    for p in scheduler.providers.status():
        name = str(p["name"])
        provider_up.add_metric([name], 1.0 if p["ok"] else 0.0)
        models = p["models"]
        provider_models.add_metric([name], float(len(models) if isinstance(models, list)
                                                 else 0))
    yield from (remote_up, provider_up, provider_models)


def _cumulative(counts: list[int], bounds: Sequence[float]) -> list[tuple[str, float]]:
    out, total = [], 0
    for le, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), counts, strict=True):
        total += n
        out.append((le, float(total)))
    return out


def _call_families(calls: dict[tuple[str, str, str, int], CallStats]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "corral_requests", "Calls answered, by configured model (\"\" when none was "
        "resolved), dialect, route template and HTTP status (499: the client went away).",
        labels=["model", "dialect", "endpoint", "status"])
    # The histograms leave the status out: merge the series that differ only by it.
    merged: dict[tuple[str, str, str], CallStats] = {}
    for (model, dialect, endpoint, status), st in calls.items():
        requests.add_metric([model, dialect, endpoint, str(status)], float(st.count))
        into = merged.get((model, dialect, endpoint))
        if into is None:
            into = merged[(model, dialect, endpoint)] = CallStats()
        into.count += st.count
        into.dur = [a + b for a, b in zip(into.dur, st.dur, strict=True)]
        into.dur_sum += st.dur_sum
        into.ttft = [a + b for a, b in zip(into.ttft, st.ttft, strict=True)]
        into.ttft_sum += st.ttft_sum
        into.ttft_count += st.ttft_count
    duration = HistogramMetricFamily(
        "corral_request_duration_seconds", "Time from a call's arrival to its last byte.",
        labels=["model", "dialect", "endpoint"])
    ttft = HistogramMetricFamily(
        "corral_time_to_first_token_seconds", "Streamed answers: time from the call's "
        "arrival to the first body byte written (queueing and loading included).",
        labels=["model", "dialect", "endpoint"])
    for labels, st in merged.items():
        duration.add_metric(list(labels), _cumulative(st.dur, _DURATION_BUCKETS), st.dur_sum)
        if st.ttft_count:
            ttft.add_metric(list(labels), _cumulative(st.ttft, _TTFT_BUCKETS), st.ttft_sum)
    yield from (requests, duration, ttft)


def _key_families(registry: Tenants) -> Iterator[Metric]:
    """Per API key, by its configured ``name`` (never the key): bounded by the config."""
    requests = CounterMetricFamily(
        "corral_key_requests", "Calls admitted per API key.", labels=["key"])
    tokens = CounterMetricFamily(
        "corral_key_tokens", "Prompt + completion tokens per API key, from the answers.",
        labels=["key"])
    rejected = CounterMetricFamily(
        "corral_key_rejected", "Calls refused with 429 per API key (over a limit).",
        labels=["key"])
    in_flight = GaugeMetricFamily(
        "corral_key_in_flight", "Calls in flight per API key.", labels=["key"])
    for name, u in registry.usage.items():
        requests.add_metric([name], float(u.requests_total))
        tokens.add_metric([name], float(u.tokens_total))
        rejected.add_metric([name], float(u.rejected_total))
        in_flight.add_metric([name], float(u.in_flight))
    yield from (requests, tokens, rejected, in_flight)


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


METRICS = web.AppKey("metrics", Metrics)
REQUEST_INFO = web.RequestKey("corral_request", RequestInfo)
