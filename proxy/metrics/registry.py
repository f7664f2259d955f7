"""Prometheus metrics: one registry per core app, fed by the calls and the scheduler.

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

This module holds the ``Metrics`` object (its registry, the per-call table, the
Events sink, the recent-requests and events rings) and the collector it registers.
The families that collector builds from call stats, keys and engines, and the
llama-server metrics and memory read per instance, are in ``proxy.metrics.scrape``;
the request middleware, the ``/metrics`` handler and the upstream poller in
``proxy.metrics.web``.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator

import aiohttp
from aiohttp import web
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
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.edge.reqlog import RequestIds, RequestInfo
from proxy.metrics.scrape import (
    _DURATION_BUCKETS,
    _TTFT_BUCKETS,
    CallStats,
    UpstreamMetrics,
    call_families,
    engine_families,
    key_families,
    resident_memory,
)
from scheduler.config.policy import variant_names
from scheduler.config.root import CorralConfig
from scheduler.process.instance import State
from scheduler.scheduling.scheduler import Scheduler

# Set by the OpenAI relay on every answer: the configured name of the model that
# served the call (a fallback's name when a fallback did).
MODEL_HEADER = "X-Corral-Model"
# On an answer translated to chat completions for an upstream that lacks its family.
TRANSLATED_HEADER = "X-Corral-Translated"
# Endpoints kept out of the recent-requests ring: the dashboard polls them every
# second and would push every real call out.
_QUIET_PREFIXES = ("/admin", "/metrics", "/dashboard", "/health")

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



def labels(cfg: CorralConfig) -> tuple[list[str], list[str]]:
    """``Metrics.set_models``'s arguments: the models' names, the variants' names."""
    return ([m.name for m in cfg.models],
            [n for m in cfg.models for n in variant_names(m.variants)])

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
        # Labels bounded by the config: server names, and the tools each lists.
        self.tool_calls = Counter(
            "corral_mcp_tool_calls", "MCP tool calls the tool loop made, by server, tool "
            "and outcome (ok, error: the tool said so, failed: no answer).",
            ["server", "tool", "outcome"], registry=r)
        self.tool_duration = Histogram(
            "corral_mcp_tool_call_duration_seconds", "Time an MCP tool call took.",
            ["server"], buckets=_DURATION_BUCKETS, registry=r)
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
        self._labels: frozenset[str] = frozenset()
        # (model, dialect, endpoint, status) -> stats; bounded like the labels are.
        self.calls: dict[tuple[str, str, str, int], CallStats] = {}
        # Route template -> the capability its row needs (filled by routes.mount).
        self.capability_of: dict[str, str] = {}
        r.register(_SchedulerCollector(self))

    # -- wiring ------------------------------------------------------------------

    def bind(self, scheduler: Scheduler, session: aiohttp.ClientSession) -> None:
        self._scheduler = scheduler
        self._session = session
        self.set_models(*labels(scheduler.config))

    def set_models(self, names: Iterable[str], variants: Iterable[str] = ()) -> None:
        """The configured model names, and the variants' (scheduler/config/policy.py):
        the only values a call's ``model`` label takes. Launches and evictions are the
        models' alone: a variant launches nothing."""
        self._models = frozenset(names)
        self._labels = self._models | frozenset(variants)
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
        if model not in self._labels:
            model = ""
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "other"
        key = (model, dialect, endpoint, status)
        st = self.calls.get(key)
        if st is None:
            st = self.calls[key] = CallStats()
        st.count += 1
        if resp is not None and TRANSLATED_HEADER in resp.headers:
            st.translated += 1
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

    def tool_called(self, server: str, tool: str, outcome: str, seconds: float) -> None:
        self.tool_calls.labels(server, tool, outcome).inc()
        self.tool_duration.labels(server).observe(seconds)

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
        await self.upstream.refresh(self._session, instances, only_active=only_active,
                                    quiet=self._scheduler.quiet)
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


# -- scrape-time collector ---------------------------------------------------------------


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler when Prometheus scrapes, not kept per call."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # names are dynamic (llama-server's); skip the duplicate check

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        yield from call_families(m.calls, m.capability_of)
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
        yield from key_families(m._scheduler.tenants)
        saver = m._scheduler.slots
        cache = CounterMetricFamily(
            "corral_slot_cache", "Slot cache actions: saves and restores of conversations' "
            "llama-server slots, and failures (which cost only the cache).", labels=["action"])
        for action, n in (("saved", saver.saved), ("restored", saver.restored),
                          ("failed", saver.failed)):
            cache.add_metric([action], float(n))
        yield cache
        yield from engine_families(m._scheduler)


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


METRICS = web.AppKey("metrics", Metrics)
