"""What a scrape reads besides the registry's own metrics (``proxy.metrics.registry``).

The per-call stats (``CallStats``, filled on the hot path) and the families made of
them; the per-key and engine families read from the scheduler; each serving
instance's own llama-server ``/metrics``, re-labelled, with the prompt and
completion token totals derived from its counters; and the instances' resident
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence

import aiohttp
import psutil
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from scheduler.keys.tenants import Tenants
from scheduler.process.instance import Instance, State
from scheduler.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

# How long a scrape waits for an instance's own /metrics before going without it.
UPSTREAM_TIMEOUT = 1.0
# Instance states whose llama-server answers HTTP.
_SERVING = frozenset({State.READY, State.DRAINING})

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class CallStats:
    """Count, duration and time-to-first-byte histograms of the calls with one label set.

    Plain ints and floats instead of prometheus_client children: every call is
    recorded on the event loop thread, so the library's per-observation lock (2-3 µs
    for a histogram) buys nothing on the hot path. Exposed by the collector.
    """

    __slots__ = ("count", "dur", "dur_sum", "translated", "ttft", "ttft_count", "ttft_sum")

    def __init__(self) -> None:
        self.count = 0
        # Of them, answered by translating to chat completions (X-Corral-Translated).
        self.translated = 0
        self.dur = [0] * (len(_DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.dur_sum = 0.0
        self.ttft = [0] * (len(_TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_count = 0


def _cumulative(counts: list[int], bounds: Sequence[float]) -> list[tuple[str, float]]:
    out, total = [], 0
    for le, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), counts, strict=True):
        total += n
        out.append((le, float(total)))
    return out


def call_families(calls: dict[tuple[str, str, str, int], CallStats],
                  capability_of: Mapping[str, str] | None = None) -> Iterator[Metric]:
    """``capability_of``: each model-routed endpoint's capability (the route table's)."""
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
        into.translated += st.translated
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
    translated = CounterMetricFamily(
        "corral_translated_requests", "Calls answered by translating them to chat "
        "completions, for an upstream that does not speak their API family (Anthropic "
        "Messages, Responses).", labels=["model", "dialect", "endpoint"])
    for labels, st in merged.items():
        duration.add_metric(list(labels), _cumulative(st.dur, _DURATION_BUCKETS), st.dur_sum)
        if st.ttft_count:
            ttft.add_metric(list(labels), _cumulative(st.ttft, _TTFT_BUCKETS), st.ttft_sum)
        if st.translated:
            translated.add_metric(list(labels), float(st.translated))
    yield from (requests, duration, ttft, translated)
    yield capability_family(calls, capability_of or {})


def capability_family(calls: dict[tuple[str, str, str, int], CallStats],
                      capability_of: Mapping[str, str]) -> Metric:
    """Calls by the capability their route needs (chat, speech, image ...): summed at
    scrape time from the per-call table, nothing more on the hot path."""
    family = CounterMetricFamily(
        "corral_capability_requests", "Model-routed calls answered, by configured model "
        "and the capability their route needs (chat, embedding, audio, speech, image ...) "
        "and HTTP status.", labels=["model", "capability", "status"])
    totals: dict[tuple[str, str, str], int] = {}
    for (model, _dialect, endpoint, status), st in calls.items():
        cap = capability_of.get(endpoint)
        if cap is not None:
            key = (model, cap, str(status))
            totals[key] = totals.get(key, 0) + st.count
    for labels, count in sorted(totals.items()):
        family.add_metric(list(labels), float(count))
    return family


def key_families(registry: Tenants) -> Iterator[Metric]:
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


def engine_families(scheduler: Scheduler) -> Iterator[Metric]:
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


def resident_memory(pids: dict[str, int]) -> dict[str, int]:
    """Resident bytes per instance id. Blocking (reads /proc): call via to_thread."""
    out = {}
    for iid, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            out[iid] = int(psutil.Process(pid).memory_info().rss)
    return out


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
                      only_active: bool = False, within: float = UPSTREAM_TIMEOUT,
                      quiet: Callable[[str], bool] | None = None) -> None:
        """Read the serving instances' /metrics; not those ``quiet`` names (a call on
        it ended early: a read now would keep llama-server from noticing, see
        ``Scheduler.quiet``), whose last figures stand until the next read."""
        async with self._lock:
            targets = [i for i in instances if i.state in _SERVING and i.base_url
                       and (quiet is None or not quiet(i.id))]
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
