"""The dashboard's pure parts: per-second differences, percentiles, chart columns, where
a config problem points, and restoring redacted secrets."""

from __future__ import annotations

import pytest

from proxy.metrics.scrape import _DURATION_BUCKETS, CallStats
from proxy.ops.config_edit import PLACEHOLDER, locate, redact_text, restore_secrets
from proxy.ops.pin import set_model_key
from proxy.ops.samples import (
    NO_MODEL,
    InstanceSecond,
    Memory,
    ModelTotals,
    Ring,
    percentile,
    second,
    series,
    totals,
)
from scheduler.config.root import CorralConfig
from scheduler.errors import BadRequest


def stats(count: int, dur_bucket: int = 3) -> CallStats:
    st = CallStats()
    st.count = count
    st.dur[dur_bucket] = count
    return st


def test_percentile_interpolates_inside_the_bucket_like_prometheus() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert percentile([0, 0, 0, 0], bounds, 0.5) is None
    assert percentile([10, 0, 0, 0], bounds, 0.5) == pytest.approx(0.5)
    assert percentile([0, 4, 0, 0], bounds, 0.5) == pytest.approx(1.5)
    assert percentile([5, 0, 5, 0], bounds, 0.95) == pytest.approx(3.8)
    assert percentile([0, 0, 0, 3], bounds, 0.5) == 4.0  # +Inf: the last finite bound


def test_totals_skip_the_dashboards_own_polls_and_count_errors() -> None:
    calls = {
        ("a", "openai", "/v1/chat/completions", 200): stats(5),
        ("a", "openai", "/v1/chat/completions", 503): stats(2),
        ("", "openai", "/v1/models", 200): stats(1),
        ("", "openai", "/admin/overview", 200): stats(99),
        ("", "openai", "/dashboard/{name}", 200): stats(99),
        ("a", "openai", "/admin/ollama/api/chat", 200): stats(1),  # the playground's
    }
    t = totals(calls, {"a": 30.0}, {"a": 12.0}, {"a": (1.5, 3.0)})
    assert t["a"].requests == 8 and t["a"].errors == 2
    assert t["a"].dur[3] == 8
    assert (t["a"].prompt, t["a"].completion, t["a"].wait_sum) == (30.0, 12.0, 1.5)
    assert t[NO_MODEL].requests == 1  # only /v1/models: admin and dashboard left out


def test_second_is_the_difference_and_none_when_idle() -> None:
    before = ModelTotals(requests=3, prompt=10.0)
    now = ModelTotals(requests=5, errors=1, prompt=25.0)
    s = second(before, now, queued=2)
    assert s is not None
    assert (s.requests, s.errors, s.prompt, s.queued) == (2, 1, 15.0, 2)
    assert second(now, now, 0) is None
    # A counter that went back (metrics rebuilt) counts from zero.
    reset = second(ModelTotals(requests=9), ModelTotals(requests=2), 0)
    assert reset is not None and reset.requests == 2


def test_ring_is_bounded_and_series_filters_by_model() -> None:
    ring = Ring(seconds=3)
    inst = InstanceSecond("a#1", "a", "ready", 1, 2, 100)
    mem = Memory(ram_used=5, ram_total=10, budget=8)
    requests = 0
    for t in range(100, 105):
        requests += 2
        now = {"a": ModelTotals(requests=requests), "b": ModelTotals(requests=t - 100)}
        ring.add(t, now, {"b": 1}, [inst], mem)
    assert [s.t for s in ring.samples] == [102, 103, 104]
    assert len(ring.window(2)) == 2
    assert [s.t for s in ring.window(3, since=102)] == [103, 104]
    assert ring.window(3, since=104) == [] and ring.window(3, since=0) == list(ring.samples)

    everything = series(ring.samples)
    assert everything["t"] == [102, 103, 104]
    assert everything["models"] == ["a", "b"]
    assert everything["requests"] == {"a": [2, 2, 2], "b": [1, 1, 1]}
    assert everything["queue"] == {"depth": [1, 1, 1], "wait": [None, None, None]}
    assert everything["instances"] == {"ready": [1, 1, 1]}
    assert everything["load"] == {"a#1": [0.5, 0.5, 0.5]}
    assert everything["memory"]["budget"] == [8, 8, 8]  # type: ignore[index]

    only_b = series(ring.samples, "b")
    assert only_b["requests"] == {"b": [1, 1, 1]}
    assert only_b["load"] == {} and only_b["instances"] == {}
    assert only_b["memory"]["instances_rss"] == [0, 0, 0]  # type: ignore[index]


def test_a_second_tick_in_a_sampled_second_adds_to_it_and_loses_nothing() -> None:
    ring = Ring(seconds=10)
    fast = ModelTotals(requests=3)
    fast.dur[0] = 3
    ring.add(100, {"a": fast}, {}, [], Memory())
    # The clock stepped back: the next tick reads second 100 again, with 2 more calls
    # of "a" and the first of "b" since the last tick.
    more = ModelTotals(requests=5)
    more.dur[0] = 5
    ring.add(100, {"a": more, "b": ModelTotals(requests=1)}, {"a": 4}, [], Memory(ram_used=7))
    (only,) = ring.samples
    assert only.t == 100
    assert (only.models["a"].requests, only.models["a"].dur[0]) == (5, 5)
    assert only.models["a"].queued == 4 and only.models["b"].requests == 1
    assert only.memory.ram_used == 7 and only.overall[2] is not None
    ring.add(99, {"a": more, "b": ModelTotals(requests=2)}, {}, [], Memory())  # further back
    assert [(s.t, s.models["b"].requests) for s in ring.samples] == [(100, 2)]
    assert series(ring.samples)["requests"] == {"a": [5], "b": [2]}


def test_series_percentiles_merge_the_models_buckets() -> None:
    ring = Ring(seconds=10)
    fast = ModelTotals(requests=10)
    fast.dur[0] = 10  # under 5 ms
    slow = ModelTotals(requests=10)
    slow.dur[len(_DURATION_BUCKETS) - 1] = 10
    ring.add(1, {}, {}, [], Memory())
    ring.add(2, {"a": fast, "b": slow}, {}, [], Memory())
    cols = series(ring.samples)
    assert cols["duration"]["p50"][0] is None  # type: ignore[index]
    assert cols["duration"]["p95"][1] > 60  # type: ignore[index]
    only_a = series(ring.samples, "a")
    assert only_a["duration"]["p95"][1] < 0.005  # type: ignore[index]


TEXT = """\
[server]
port = 8080
api_keys = ["sekret-1", "sekret-2"]

[scheduler]
max_instances = 2

[[models]]
name = "a"
path = "/m/a.gguf"

[[models]]
name = "b"
path = "/m/b.gguf"
parallel = 0
"""


@pytest.mark.parametrize(
    ("problem", "line"),
    [
        ("/c.toml: model 'b': parallel: Input should be greater than or equal to 1", 15),
        ("/c.toml: model 'b': (top level): Value error, set only one of", 12),
        ("/c.toml: model 'a': ttl: refused over HTTP", 8),  # not there: the model's header
        ("/c.toml: models[1]: parallel: bad", 15),
        ("/c.toml: server.port: Input should be a valid integer", 2),
        ("/c.toml: scheduler.memory_budget: bad", 5),
        ("/c.toml: invalid TOML: Expected '=' (at line 7, column 3)", 7),
        ("/c.toml: models_dir: nowhere is not a directory", None),
        ("/other/models.d/x.toml: model 'x': parallel: bad", None),
        ("/other/models.d/x.toml: invalid TOML: Expected '=' (at line 3, column 1)", None),
        ("/c.toml: (top level): Value error, two models named 'a'", None),
    ],
)
def test_locate_finds_the_line_a_problem_points_at(problem: str, line: int | None) -> None:
    assert locate(TEXT, problem, "/c.toml") == line


def test_secrets_are_redacted_and_restored_only_where_they_stood() -> None:
    running = CorralConfig(server={"api_keys": ["sekret-1", "sekret-2"]})
    text = TEXT + (
        '\n[[models]]\nname = "c"\nremotes = ["http://x"]\nenv = { HF_TOKEN = "hf_tok" }\n')
    shown = redact_text(text, running)
    assert "sekret" not in shown and "hf_tok" not in shown and shown.count(PLACEHOLDER) == 3
    edited = shown.replace("port = 8080", "port = 9090")
    restored = restore_secrets(edited, text, running)
    assert restored == text.replace("port = 8080", "port = 9090")
    assert restore_secrets("[server]\nport = 1\n", text, running) == "[server]\nport = 1\n"

    # A placeholder moved into a value another endpoint shows would leak a secret.
    leak = shown.replace('name = "a"', f'name = "{PLACEHOLDER}"').replace(
        f'"{PLACEHOLDER}", "{PLACEHOLDER}"', f'"{PLACEHOLDER}"')
    with pytest.raises(BadRequest, match="only where"):
        restore_secrets(leak, text, running)
    with pytest.raises(BadRequest, match="placeholder"):
        restore_secrets(shown + f"# {PLACEHOLDER}\n", text, running)


PIN_TEXT = """\
[server]
port = 1

[[models]]
name = "a"  # the first
path = "/m/a.gguf"
evictable = true

[[models]]
name = "b"
path = "/m/b.gguf"
[models.replicas]
min = 1
"""


def test_set_model_key_replaces_or_adds_the_line_in_that_model_only() -> None:
    out = set_model_key(PIN_TEXT, "a", "evictable", "false")
    assert out == PIN_TEXT.replace("evictable = true", "evictable = false")
    out = set_model_key(PIN_TEXT, "b", "evictable", "false")
    assert out == PIN_TEXT.replace('name = "b"\n', 'name = "b"\nevictable = false\n')
    with pytest.raises(BadRequest, match="not a \\[\\[models\\]\\] table"):
        set_model_key(PIN_TEXT, "c", "evictable", "false")
    with pytest.raises(BadRequest):
        set_model_key('[server]\nname = "a"\n', "a", "evictable", "false")


def test_probe_memory_sums_vram_and_stops_looking_without_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.ops import timeseries
    from scheduler.models import resources

    gpus = [resources.GpuInfo(index=0, name="a", vram_total=100, vram_free=40),
            resources.GpuInfo(index=1, name="b", vram_total=50, vram_free=50)]
    monkeypatch.setattr(resources, "probe_gpus", lambda: (gpus, "driver 1"))
    rss, used, total, vram_used, vram_total, again = timeseries.probe_memory({}, True)
    assert rss == {} and total >= used > 0
    assert (vram_used, vram_total, again) == (60, 150, True)
    monkeypatch.setattr(resources, "probe_gpus",
                        lambda: ([], "NVML not available: no pynvml module"))
    assert timeseries.probe_memory({}, True)[3:] == (0, 0, False)
    monkeypatch.setattr(resources, "probe_gpus", lambda: pytest.fail("probed again"))
    assert timeseries.probe_memory({}, False)[3:] == (0, 0, False)
