"""A real Prometheus scrapes a real Corral serving the real Gemma 3 270M.

Known traffic goes through Corral; PromQL over Prometheus's HTTP API must then
return exactly the counts that traffic implies, and ``promtool check metrics`` must
find nothing to complain about in Corral's exposition. Needs Debian's
``prometheus`` package (``/usr/bin/prometheus``, ``/usr/bin/promtool``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import REPO, CorralProc, Tidy, model_toml
from tests.fakes import free_port, stop

pytestmark = pytest.mark.e2e

KEY = "e2e-scrape-key"
HELLO = [{"role": "user", "content": "Say hello."}]


def binary(name: str) -> str:
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if found is None:
        pytest.fail(f"{name} not found: apt-get install -y prometheus")
    return found


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """``start(corral_port)`` runs Prometheus scraping it every second; returns its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            # A loaded 2-core CI box can take over a second to answer a scrape; a
            # timed-out scrape leaves the last value in place and the test waiting.
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n"
            "scrape_configs:\n  - job_name: corral\n"
            f"    authorization:\n      credentials: {KEY}\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready:\n{log_path.read_text()}")
            time.sleep(0.1)

    yield start
    for proc in procs:
        stop(proc, 10)


def query(url: str, promql: str) -> list[dict[str, object]]:
    r = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)
    if not result:
        return None
    assert len(result) == 1, result
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


def eventually(url: str, promql: str, want: float, timeout: float = 60) -> None:
    """Wait until Prometheus has scraped a sample that gives ``want``."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = scalar(url, promql)
        if got == want:
            return
        time.sleep(0.25)
    raise AssertionError(f"{promql} = {got}, want {want}")


def test_prometheus_scrapes_the_expected_counts(
    corral: Callable[..., CorralProc], gemma: Path, prometheus: Callable[[int], str], tidy: Tidy
) -> None:
    c = corral(model_toml("gemma", gemma, aliases=["g"]), server=f'api_keys = ["{KEY}"]')
    prom = prometheus(c.port)
    oc = tidy(openai.OpenAI(base_url=c.url + "/v1", api_key=KEY, max_retries=0, timeout=120))

    completion = 0
    for _ in range(3):
        resp = oc.chat.completions.create(model="g", messages=HELLO, max_tokens=4)
        assert resp.usage is not None
        completion += resp.usage.completion_tokens
    for _ in range(2):
        stream = oc.chat.completions.create(
            model="gemma",
            messages=HELLO,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage:
                completion += chunk.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        oc.chat.completions.create(model="nope", messages=HELLO)
    assert completion > 0

    chat = 'endpoint="/v1/chat/completions"'
    eventually(
        prom,
        f'sum(corral_requests_total{{job="corral",{chat},model="gemma",'
        'status="200",dialect="openai"})',
        5,
    )
    eventually(prom, f'sum(corral_requests_total{{{chat},model="",status="404"}})', 1)
    eventually(prom, f'sum(corral_request_duration_seconds_count{{{chat},model="gemma"}})', 5)
    eventually(prom, f'sum(corral_time_to_first_token_seconds_count{{{chat},model="gemma"}})', 2)
    eventually(prom, 'sum(corral_completion_tokens_total{model="gemma"})', completion)
    eventually(prom, 'sum(corral_llamacpp_tokens_predicted_total{model="gemma"})', completion)
    eventually(prom, 'sum(corral_instance_launches_total{model="gemma",result="ok"})', 1)
    eventually(prom, 'sum(corral_instance_load_duration_seconds_count{model="gemma"})', 1)
    eventually(prom, 'sum(corral_instances{model="gemma",state="ready"})', 1)
    eventually(prom, 'sum(corral_queue_depth{model="gemma"})', 0)
    eventually(prom, 'sum(corral_instance_slots{model="gemma"})', 1)
    eventually(prom, 'up{job="corral"}', 1)
    eventually(prom, "corral_config_reload_success", 1)
    assert (scalar(prom, 'sum(corral_prompt_tokens_total{model="gemma"})') or 0) > 0
    assert (scalar(prom, 'process_resident_memory_bytes{job="corral"}') or 0) > 0
    # A latency quantile computes: the buckets are well formed.
    p50 = scalar(
        prom,
        "histogram_quantile(0.5, sum by (le) "
        f'(corral_request_duration_seconds_bucket{{{chat},model="gemma"}}))',
    )
    assert p50 is not None and 0 < p50 < 120

    # Every query of the shipped Grafana dashboard parses and most find data.
    dashboard = json.loads((REPO / "deploy" / "grafana" / "corral-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    pending = [
        e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$model", ".*")
        for e in exprs
    ]
    deadline = time.monotonic() + 20
    while pending and time.monotonic() < deadline:
        # rate() needs a second sample of a series that appeared with the traffic.
        pending = [e for e in pending if not query(prom, e)]
        time.sleep(0.5)
    assert not pending, pending

    # Corral's own instance label does not collide with Prometheus's target label.
    (series,) = query(prom, 'corral_instance_slots{model="gemma"}')
    labels = series["metric"]
    assert isinstance(labels, dict)
    assert labels["instance"] == f"127.0.0.1:{c.port}"
    assert labels["instance_id"].startswith("gemma#")
    assert "exported_instance" not in labels


def test_promtool_finds_no_problem(
    corral: Callable[..., CorralProc], gemma: Path, tidy: Tidy
) -> None:
    c = corral(model_toml("gemma", gemma))
    oc = tidy(openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=120))
    oc.chat.completions.create(model="gemma", messages=HELLO, max_tokens=2)
    body = httpx.get(c.url + "/metrics", timeout=10)
    assert body.status_code == 200
    assert "corral_llamacpp_tokens_predicted_total" in body.text
    check = subprocess.run(
        [binary("promtool"), "check", "metrics"],
        input=body.content,
        capture_output=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b""
