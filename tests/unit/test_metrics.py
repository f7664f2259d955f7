"""Pure pieces of metrics, request ids and reload: no server, no process."""

from __future__ import annotations

import logging

from prometheus_client.parser import text_string_to_metric_families

from proxy.edge.reqlog import CURRENT, RequestIdFilter, RequestIds, RequestInfo, note_model
from proxy.metrics.registry import Metrics
from proxy.metrics.scrape import UpstreamMetrics, corral_name
from proxy.ops.reload import Outcome, backup_path, server_changes
from scheduler.config.root import CorralConfig

LLAMA = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {prompt}
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total {predicted}
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
"""


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_corral_name() -> None:
    assert corral_name("llamacpp:n_decode_total") == "corral_llamacpp_n_decode_total"


def test_token_totals_add_what_each_counter_gained_and_survive_resets() -> None:
    up = UpstreamMetrics()
    assert up.ingest("m#1", "m", LLAMA.format(prompt=10, predicted=4))
    assert (up.prompt_tokens["m"], up.completion_tokens["m"]) == (10, 4)
    up.ingest("m#1", "m", LLAMA.format(prompt=15, predicted=9))
    assert (up.prompt_tokens["m"], up.completion_tokens["m"]) == (15, 9)
    up.ingest("m#1", "m", LLAMA.format(prompt=15, predicted=9))  # nothing new
    assert up.completion_tokens["m"] == 9
    # A second instance of the same model counts from its own zero.
    up.ingest("m#2", "m", LLAMA.format(prompt=1, predicted=2))
    assert up.completion_tokens["m"] == 11
    # A counter that went down restarted: all of its value is new.
    up.ingest("m#1", "m", LLAMA.format(prompt=3, predicted=1))
    assert (up.prompt_tokens["m"], up.completion_tokens["m"]) == (19, 12)


def test_upstream_families_are_relabelled_and_merged() -> None:
    up = UpstreamMetrics()
    up.ingest("m#1", "m", LLAMA.format(prompt=1, predicted=2))
    up.ingest("n#2", "n", LLAMA.format(prompt=3, predicted=4))
    fams = {f.name: f for f in up.families()}
    assert set(fams) == {
        "corral_llamacpp_prompt_tokens",
        "corral_llamacpp_tokens_predicted",
        "corral_llamacpp_requests_processing",
    }
    predicted = fams["corral_llamacpp_tokens_predicted"]
    assert predicted.type == "counter"
    assert [(s.name, s.labels, s.value) for s in predicted.samples] == [
        ("corral_llamacpp_tokens_predicted_total", {"model": "m", "instance_id": "m#1"}, 2),
        ("corral_llamacpp_tokens_predicted_total", {"model": "n", "instance_id": "n#2"}, 4),
    ]


def test_unreadable_upstream_metrics_are_skipped() -> None:
    up = UpstreamMetrics()
    assert not up.ingest("m#1", "m", "this is { not prometheus")
    assert up.latest == {} and not up.completion_tokens


def test_events_feed_counters_and_histograms() -> None:
    m = Metrics()
    m.set_models(["a", "b"])
    m.launched("a", 1.5, True)
    m.launched("b", 0.2, False)
    m.stopped("a", "evicted")
    m.stopped("a", "idle")
    m.crashed("b")
    m.waited("a", 0.3, "granted")
    s = samples(m)
    assert s[("corral_instance_launches_total", frozenset({("model", "a"), ("result", "ok")}))] == 1
    assert (
        s[("corral_instance_launches_total", frozenset({("model", "b"), ("result", "failed")}))]
        == 1
    )
    assert s[("corral_instance_load_duration_seconds_sum", frozenset({("model", "a")}))] == 1.5
    assert s[("corral_evictions_total", frozenset({("model", "a")}))] == 1
    assert s[("corral_instance_stops_total", frozenset({("model", "a"), ("reason", "idle")}))] == 1
    assert s[("corral_instance_crashes_total", frozenset({("model", "b")}))] == 1
    assert (
        s[("corral_queue_wait_seconds_count", frozenset({("model", "a"), ("outcome", "granted")}))]
        == 1
    )
    # Pre-created at 0 so that increase() sees the first launch of a model.
    assert s[("corral_instance_crashes_total", frozenset({("model", "a")}))] == 0
    assert not [name for name, _ in s if name.endswith("_created")]
    assert [e["event"] for e in m.events] == [
        "launched",
        "launch-failed",
        "stopped",
        "stopped",
        "crashed",
    ]


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    one, two = Metrics(), Metrics()
    one.crashed("x")
    assert ("corral_instance_crashes_total", frozenset({("model", "x")})) not in samples(two)


def test_config_reload_gauges() -> None:
    m = Metrics()
    m.config_loaded(False)
    s = samples(m)
    assert s[("corral_config_reload_success", frozenset())] == 0
    assert s[("corral_config_reloads_total", frozenset({("result", "error")}))] == 1
    m.config_loaded(True)
    s = samples(m)
    assert s[("corral_config_reload_success", frozenset())] == 1
    assert s[("corral_config_last_reload_timestamp_seconds", frozenset())] > 1.7e9


def test_request_ids_are_unique_and_client_ids_are_checked() -> None:
    ids = RequestIds()
    minted = {ids.new() for _ in range(1000)}
    assert len(minted) == 1000
    assert ids.accept("abc-123") == "abc-123"
    for bad in (None, "", "x" * 129, "tab\there", "nl\nhere", "é"):
        assert ids.accept(bad) != bad


def test_log_filter_tags_records_made_during_a_call() -> None:
    f = RequestIdFilter()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    f.filter(record)
    assert record.request_id is None and record.request_tag == ""
    token = CURRENT.set(RequestInfo("req-1", 0.0))
    try:
        note_model("m")
        assert CURRENT.get() is not None and CURRENT.get().model == "m"  # type: ignore[union-attr]
        f.filter(record)
    finally:
        CURRENT.reset(token)
    assert record.request_id == "req-1" and record.request_tag == " [req-1]"
    note_model("ignored outside a call")


def test_server_changes_name_the_keys() -> None:
    old = CorralConfig()
    new = CorralConfig(server={"port": 9000, "api_keys": ["k"]})
    assert server_changes(old, new) == ["server.port", "server.api_keys"]
    assert server_changes(old, old) == []


def test_outcome_and_backup_path() -> None:
    from pathlib import Path

    assert backup_path(Path("/etc/corral/corral.toml")) == Path("/etc/corral/corral.toml.bak")
    o = Outcome(False, "file", 12.34567, error="bad")
    assert o.as_dict() == {
        "ok": False,
        "source": "file",
        "time": 12.346,
        "changes": {},
        "restart_required": [],
        "error": "bad",
    }


async def test_calls_are_recorded_without_prometheus_children() -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    request._match_info = await app.router.resolve(request)
    m = Metrics()
    m.set_models(["m"])
    for elapsed, first_byte in ((0.25, 0.0), (0.3, 0.04), (400.0, 0.0)):
        info = RequestInfo("r", 1.0)
        info.model = "m"
        info.first_byte = 1.0 + first_byte if first_byte else 0.0
        m.record(request, info, "openai", 200, elapsed, None)
    info = RequestInfo("r", 1.0)
    info.model = "not configured"
    m.record(request, info, "openai", 404, 0.001, None)

    s = samples(m)
    lab = {("model", "m"), ("dialect", "openai"), ("endpoint", "/v1/chat/completions")}
    assert s[("corral_requests_total", frozenset({*lab, ("status", "200")}))] == 3
    assert (
        s[
            (
                "corral_requests_total",
                frozenset(
                    {
                        ("model", ""),
                        ("dialect", "openai"),
                        ("endpoint", "/v1/chat/completions"),
                        ("status", "404"),
                    }
                ),
            )
        ]
        == 1
    )
    # le is inclusive: 0.25 falls in the 0.25 bucket; 400 only in +Inf.
    assert s[("corral_request_duration_seconds_bucket", frozenset({*lab, ("le", "0.1")}))] == 0
    assert s[("corral_request_duration_seconds_bucket", frozenset({*lab, ("le", "0.25")}))] == 1
    assert s[("corral_request_duration_seconds_bucket", frozenset({*lab, ("le", "0.5")}))] == 2
    assert s[("corral_request_duration_seconds_bucket", frozenset({*lab, ("le", "300.0")}))] == 2
    assert s[("corral_request_duration_seconds_bucket", frozenset({*lab, ("le", "+Inf")}))] == 3
    assert s[("corral_request_duration_seconds_count", frozenset(lab))] == 3
    assert s[("corral_request_duration_seconds_sum", frozenset(lab))] == 400.55
    assert s[("corral_time_to_first_token_seconds_count", frozenset(lab))] == 1
    assert s[("corral_time_to_first_token_seconds_bucket", frozenset({*lab, ("le", "0.05")}))] == 1
    assert [r["status"] for r in m.recent_requests(10)] == [404, 200, 200, 200]
    assert m.recent_requests(0) == []
