"""Metrics: the pure cores, ``GET /metrics`` (JSON and Prometheus) after known traffic on a live
server, and the ``/dashboard`` page in headless Chromium."""

from __future__ import annotations

import collections
import math
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from support import (
    API_KEY,
    BRIDGE_TOKEN,
    RawHTTP,
    chat_body,
    in_thread,
    make_settings,
    openai_client,
    start_server,
    wait_until,
)
from trioprovider.agents.echo import EchoAgent
from trioprovider.agents.runner import run_agent
from trioprovider.metrics import (
    CpuMeter,
    LatencyWindow,
    RateMeter,
    cancel_reason,
    distribution_ms,
    outcome_kind,
    parse_vmrss_mb,
    percentile,
    resident_memory_mb,
)
from trioprovider.routes.metrics import wants_json
from trioprovider.server import Running
from trioprovider.tallies import CounterTally, HistogramTally
from trioprovider.tokens import estimate_prompt_tokens

ARTIFACTS = Path(__file__).parent / "artifacts"


# -- pure cores ----------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 95) == 0.0
    assert percentile([1.0, 2.0], 1) == 1.0


def test_distribution_in_milliseconds() -> None:
    assert distribution_ms([0.010, 0.020, 0.030, 0.040]) == {"avg": 25.0, "p50": 20.0, "p95": 40.0, "p99": 40.0}
    assert distribution_ms([]) == {"avg": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}


def test_latency_window_keeps_only_the_last_requests() -> None:
    window = LatencyWindow(size=3)
    for seconds in (10.0, 0.001, 0.002, 0.003):
        window.add(seconds, first_token=seconds / 2 if seconds < 1 else None)
    assert list(window.durations) == [0.001, 0.002, 0.003]  # the 10 s one fell out
    summary = window.summary()
    assert summary["response"]["p99"] == 3.0
    assert summary["first_token"] == {"avg": 1.0, "p50": 1.0, "p95": 1.5, "p99": 1.5}


def test_rate_meter_averages_over_its_horizon() -> None:
    meter = RateMeter(horizon=10, start=0.0)
    assert meter.rate(0.0) == 0.0
    for t in range(20):
        meter.add(100.0 + t, amount=2.0)  # two a second, for twenty seconds
    assert meter.rate(119.5) == pytest.approx(2.0)
    assert meter.rate(125.5) == pytest.approx(2.0 * 4 / 10)  # six seconds of silence
    assert meter.rate(200.0) == 0.0  # all of it older than the horizon
    young = RateMeter(horizon=60, start=10.0)
    young.add(11.0, 3.0)
    assert young.rate(12.0) == pytest.approx(1.5)  # over the two seconds it has been up


def test_cpu_meter_is_percent_of_a_core_between_samples() -> None:
    meter = CpuMeter(wall=0.0, cpu=0.0)
    assert meter.sample(2.0, 0.5) == 25.0
    assert meter.sample(4.0, 2.5) == 100.0
    assert meter.sample(4.0, 3.0) == 0.0  # no time passed: nothing to say


def test_resident_memory_from_proc_status() -> None:
    status = "Name:\tpython\nVmPeak:\t  300000 kB\nVmRSS:\t   51200 kB\nThreads:\t4\n"
    assert parse_vmrss_mb(status) == 50.0
    assert parse_vmrss_mb("Name:\tkthreadd\n") is None
    assert 1 < resident_memory_mb() < 100_000


def test_outcomes_and_cancel_reasons() -> None:
    assert outcome_kind("completed") == "successful"
    assert outcome_kind("failed") == "failed"
    for stopped in ("cancelled", "deadline", "session_revoked", "client_too_slow", "shutdown"):
        assert outcome_kind(stopped) == "cancelled"
    assert cancel_reason("cancelled") == "client_disconnected"
    assert cancel_reason("deadline") == "deadline"


def test_tallies_read_as_the_client_librarys_own_counter_and_histogram() -> None:
    """Same samples, same values, same names as prometheus_client's Counter and Histogram."""
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "Requests.", ["route"], registry=registry)
    histogram = Histogram("demo_seconds", "Durations.", ["route"], buckets=(0.1, 1, math.inf), registry=registry)
    plain = Histogram("demo_cancel_seconds", "No labels.", buckets=(0.5, math.inf), registry=registry)
    counts = CounterTally("demo_requests", "Requests.", ["route"], clock=lambda: 5.0)
    durations = HistogramTally("demo_seconds", "Durations.", ["route"], (0.1, 1, math.inf), clock=lambda: 5.0)
    unlabelled = HistogramTally("demo_cancel_seconds", "No labels.", [], (0.5, math.inf), clock=lambda: 5.0)
    for route, seconds in [("/a", 0.05), ("/a", 0.1), ("/a", 0.7), ("/b", 3.0), ("/a", 1.0)]:
        counter.labels(route).inc(2)
        counts.inc((route,), 2)
        histogram.labels(route).observe(seconds)
        durations.observe((route,), seconds)
    plain.observe(0.7)
    unlabelled.observe((), 0.7)

    def samples(metrics: Iterable[Any]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (sample.name, tuple(sorted(sample.labels.items())), sample.value if not sample.name.endswith("_created") else 5.0)
            for metric in metrics
            for sample in metric.samples
        }

    theirs = {metric.name: metric for metric in registry.collect()}
    for ours in (counts.family(), durations.family(), unlabelled.family()):
        assert (ours.name, ours.type, ours.documentation) == (theirs[ours.name].name, theirs[ours.name].type, theirs[ours.name].documentation)
        assert samples([ours]) == samples([theirs[ours.name]])
    # A value on a bound falls in that bucket (le: less than or equal).
    assert ("demo_seconds_bucket", (("le", "0.1"), ("route", "/a")), 2) in samples([durations.family()])
    # Without labels, its one series is there before the first observation.
    fresh = HistogramTally("demo_idle_seconds", "Idle.", [], (1, math.inf)).family()
    assert {(sample.name, sample.value) for sample in fresh.samples if sample.name != "demo_idle_seconds_created"} == {
        ("demo_idle_seconds_bucket", 0), ("demo_idle_seconds_count", 0), ("demo_idle_seconds_sum", 0.0)
    }


def test_format_negotiation() -> None:
    assert wants_json("application/json", None)
    assert wants_json("text/plain", "json")
    assert not wants_json("application/json", "prometheus")
    assert not wants_json("*/*", None)
    assert not wants_json("text/html,application/xhtml+xml,*/*;q=0.8", None)
    assert not wants_json("application/openmetrics-text; version=1.0.0,application/json;q=0.1", None)


# -- known traffic on a live server --------------------------------------------------------------

#: In every prompt: it must never show up in metrics.
SENTINEL = "prompt-sentinel-7f3a"
USER = [{"role": "user", "content": f"hello {SENTINEL}"}]


@dataclass
class Traffic:
    running: Running
    slow: EchoAgent
    #: What the client saw: HTTP status -> count, for the model requests sent.
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    #: Usage the client was told for each completed request.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: When the client hung up on the stopped request, and when its agent saw model_cancel.
    hung_up_at: float = 0.0


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


async def known_traffic(nursery: trio.Nursery) -> Traffic:
    """Three completed requests, one the client walks out of, one for an unknown model, and two
    refused by the rate limit (one per minute plus a burst of three: four admitted)."""
    settings = make_settings(
        **{
            "agents.echo.tokens": 6,
            "rate_limiting.requests_per_minute": 1,
            "rate_limiting.burst_allowance": 3,
        }
    )
    running = await start_server(nursery, settings, agents=("echo",))
    slow = EchoAgent(tokens=1000, delay=0.02, models=["slow"], agent_id="slow-echo")
    nursery.start_soon(partial(run_agent, slow, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
    await wait_until(lambda: len(running.provider.bridge.agents()) == 2)
    traffic = Traffic(running, slow)
    client = openai_client(running)

    for _ in range(2):
        chunks = await in_thread(
            lambda: list(
                client.chat.completions.create(
                    model="echo", messages=USER, stream=True, stream_options={"include_usage": True}
                )
            )
        )
        usage = chunks[-1].usage
        traffic.prompt_tokens += usage.prompt_tokens
        traffic.completion_tokens += usage.completion_tokens
        traffic.statuses[200] += 1
    whole = await in_thread(client.chat.completions.create, model="echo", messages=USER)
    traffic.prompt_tokens += whole.usage.prompt_tokens
    traffic.completion_tokens += whole.usage.completion_tokens
    traffic.statuses[200] += 1

    http = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(f"hello {SENTINEL}", model="slow"))
    await http.read_until(b'"content"')
    traffic.statuses[200] += 1
    traffic.hung_up_at = await http.hang_up()
    with trio.fail_after(5):
        await slow.cancel_arrived.wait()
    await wait_until(lambda: not running.provider.scopes)

    url = f"{running.provider_url}/v1/chat/completions"
    unknown = await in_thread(httpx.post, url, headers=_auth(), content=chat_body(SENTINEL, model="no-such-model"))
    traffic.statuses[unknown.status_code] += 1
    for _ in range(2):
        limited = await in_thread(httpx.post, url, headers=_auth(), content=chat_body(SENTINEL, model="echo"))
        traffic.statuses[limited.status_code] += 1
    assert traffic.statuses == {200: 4, 404: 1, 429: 2}, traffic.statuses
    return traffic


async def get_metrics(running: Running, **headers: str) -> httpx.Response:
    return await in_thread(httpx.get, f"{running.provider_url}/metrics", headers={**_auth(), **headers})


async def test_metrics_json_counts_known_traffic(nursery: trio.Nursery) -> None:
    traffic = await known_traffic(nursery)
    response = await get_metrics(traffic.running, Accept="application/json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert SENTINEL not in response.text
    m = response.json()

    assert m["requests"] == {
        "total": 7,
        "successful": 3,
        "failed": 1,  # the unknown model
        "rate_limited": 2,
        "cancelled": 1,
        "active": 0,
        "active_streams": 0,
        "per_second": m["requests"]["per_second"],
    }
    assert m["requests"]["per_second"] > 0
    assert m["sessions"] == {"active": 1, "total_created": 1, "total_expired": 0}

    cancelled_prompt = estimate_prompt_tokens([{"role": "user", "content": f"hello {SENTINEL}"}], None)
    tokens = m["tokens"]
    assert tokens["prompt"] == traffic.prompt_tokens + cancelled_prompt
    assert tokens["completion"] > traffic.completion_tokens  # plus what the walked-out stream got
    assert tokens["total_processed"] == tokens["prompt"] + tokens["completion"]
    assert tokens["avg_tokens_per_request"] == round(tokens["total_processed"] / 4, 1)
    assert tokens["tokens_per_second"] > 0

    performance = m["performance"]
    assert performance["window_requests"] == 4
    assert 0 < performance["p50_response_time_ms"] <= performance["p95_response_time_ms"] <= performance["p99_response_time_ms"]
    assert performance["avg_response_time_ms"] > 0
    assert 0 < performance["p50_time_to_first_token_ms"] <= performance["p99_time_to_first_token_ms"]
    assert 1 < performance["memory_usage_mb"] < 100_000
    assert performance["cpu_usage_percent"] >= 0

    cancellations = m["cancellations"]
    assert cancellations["total"] == 1
    assert cancellations["by_reason"] == {"client_disconnected": 1}
    # From the disconnect reaching the app to model_cancel sent: well under the test's own bound.
    slow_cancel_ms = (traffic.slow.cancelled[0][1] - traffic.hung_up_at) * 1000
    assert 0 < cancellations["avg_disconnect_to_cancel_ms"] < max(1000.0, slow_cancel_ms + 1)

    agents = {agent["agent_id"]: agent for agent in m["agents"]}
    assert agents["echo"]["models"] == ["echo"] and agents["slow-echo"]["models"] == ["slow"]
    assert agents["echo"]["in_flight"] == 0

    recent = m["recent"]  # newest first
    assert [(e["kind"], e.get("status"), e.get("code")) for e in recent] == [
        ("rate_limited", 429, "rate_limit_exceeded"),
        ("rate_limited", 429, "rate_limit_exceeded"),
        ("error", 404, "model_not_found"),
        ("cancellation", None, None),
    ]
    assert {e["route"] for e in recent} == {"/v1/chat/completions"}
    assert recent[3]["reason"] == "client_disconnected" and recent[3]["model"] == "slow"
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", e["time"]) for e in recent)


def _samples(text: str) -> dict[str, list[Any]]:
    """Prometheus text parsed by prometheus_client's own parser: family name -> samples."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(samples: list[Any], name: str, **labels: str) -> float:
    matching = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, samples)
    return float(matching[0])


async def test_metrics_prometheus_text_parses_and_counts_known_traffic(nursery: trio.Nursery) -> None:
    traffic = await known_traffic(nursery)
    json_view = (await get_metrics(traffic.running, Accept="application/json")).json()
    response = await get_metrics(traffic.running)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert SENTINEL not in response.text
    families = _samples(response.text)

    http = families["trioprovider_http_requests"]
    chat = "/v1/chat/completions"
    assert _value(http, "trioprovider_http_requests_total", route=chat, status="200", method="POST") == 4
    assert _value(http, "trioprovider_http_requests_total", route=chat, status="404") == 1
    assert _value(http, "trioprovider_http_requests_total", route=chat, status="429") == 2
    assert _value(http, "trioprovider_http_requests_total", route="/metrics", status="200") == 1  # the JSON one
    durations = families["trioprovider_http_request_duration_seconds"]
    assert _value(durations, "trioprovider_http_request_duration_seconds_count", route=chat) == 7
    assert _value(durations, "trioprovider_http_request_duration_seconds_bucket", route=chat, le="+Inf") == 7

    model = families["trioprovider_model_requests"]
    assert _value(model, "trioprovider_model_requests_total", model="echo", outcome="completed") == 3
    assert _value(model, "trioprovider_model_requests_total", model="slow", outcome="cancelled") == 1
    assert _value(model, "trioprovider_model_requests_total", model="echo", outcome="rate_limited") == 2
    # An unknown name is no label value (a client could make series without end); it counts as "unknown".
    assert _value(model, "trioprovider_model_requests_total", model="unknown", outcome="refused") == 1
    assert "no-such-model" not in response.text
    first_token = families["trioprovider_time_to_first_token_seconds"]
    assert _value(first_token, "trioprovider_time_to_first_token_seconds_count", model="echo") == 3
    assert _value(first_token, "trioprovider_time_to_first_token_seconds_count", model="slow") == 1

    tokens = families["trioprovider_tokens"]
    total_in = sum(s.value for s in tokens if s.name == "trioprovider_tokens_total" and s.labels["direction"] == "input")
    total_out = sum(s.value for s in tokens if s.name == "trioprovider_tokens_total" and s.labels["direction"] == "output")
    assert (total_in, total_out) == (json_view["tokens"]["prompt"], json_view["tokens"]["completion"])
    assert _value(tokens, "trioprovider_tokens_total", model="echo", direction="output") == traffic.completion_tokens

    assert _value(families["trioprovider_cancellations"], "trioprovider_cancellations_total", reason="client_disconnected") == 1
    propagation = families["trioprovider_cancel_propagation_seconds"]
    assert _value(propagation, "trioprovider_cancel_propagation_seconds_count") == 1
    assert 0 < _value(propagation, "trioprovider_cancel_propagation_seconds_sum") < 1.0
    limited = families["trioprovider_rate_limited_requests"]
    assert _value(limited, "trioprovider_rate_limited_requests_total", limit="rate_limit_exceeded") == 2

    assert _value(families["trioprovider_sessions_active"], "trioprovider_sessions_active") == 1
    assert _value(families["trioprovider_sessions_created"], "trioprovider_sessions_created_total") == 1
    assert _value(families["trioprovider_sessions_expired"], "trioprovider_sessions_expired_total") == 0
    assert _value(families["trioprovider_active_streams"], "trioprovider_active_streams") == 0
    assert _value(families["trioprovider_agents_connected"], "trioprovider_agents_connected") == 2
    assert _value(families["trioprovider_agent_in_flight"], "trioprovider_agent_in_flight", agent="slow-echo") == 0
    assert _value(families["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0

    # ?format= wins over Accept; OpenMetrics on request; anything else is a 400.
    explicit = await in_thread(
        httpx.get, f"{traffic.running.provider_url}/metrics?format=prometheus", headers={**_auth(), "Accept": "application/json"}
    )
    assert explicit.headers["content-type"].startswith("text/plain") and "trioprovider_tokens_total" in explicit.text
    openmetrics = await get_metrics(traffic.running, Accept="application/openmetrics-text; version=1.0.0")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    bad = await in_thread(httpx.get, f"{traffic.running.provider_url}/metrics?format=xml", headers=_auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"


async def test_metrics_need_a_key(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_settings(**{"ollama.listen": "127.0.0.1:0"}))
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        refused = await in_thread(httpx.get, f"{running.provider_url}/metrics", headers={**headers, "Accept": "application/json"})
        assert refused.status_code == 401 and refused.json()["error"]["code"]
    keyless = await in_thread(httpx.get, f"{running.ollama_url}/metrics")
    assert keyless.status_code == 403
    page = await in_thread(httpx.get, f"{running.provider_url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "'sha256-" in policy
    # Self-contained: no external scripts, styles, fonts or images.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)


async def test_metrics_count_a_deadline_as_a_cancellation(nursery: trio.Nursery) -> None:
    settings = make_settings(**{"performance.request_timeout": 0.2})
    running = await start_server(nursery, settings)
    thinker = EchoAgent(tokens=5, delay=30.0, agent_id="thinker")
    nursery.start_soon(partial(run_agent, thinker, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
    await wait_until(lambda: running.provider.bridge.agents())
    answer = await in_thread(
        httpx.post, f"{running.provider_url}/v1/chat/completions", headers=_auth(), content=chat_body(stream=False)
    )
    assert answer.status_code == 504
    await wait_until(lambda: not running.provider.scopes)
    m = (await get_metrics(running, Accept="application/json")).json()
    assert m["requests"]["cancelled"] == 1 and m["cancellations"]["by_reason"] == {"deadline": 1}
    assert m["recent"][0]["kind"] == "cancellation" and m["recent"][0]["code"] == "timeout"
    assert 0 < m["cancellations"]["avg_disconnect_to_cancel_ms"] < 1000


# -- the dashboard in headless Chromium ----------------------------------------------------------


class _Texts(HTMLParser):
    """The text of every element with an id, and of every table row (by its tbody's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = collections.defaultdict(list)
        self._open: list[tuple[str, str | None]] = []
        self._tbody: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("input", "meta", "br", "img"):
            return
        ident = dict(attrs).get("id")
        self._open.append((tag, ident))
        if ident is not None:
            self.by_id.setdefault(ident, "")
        if tag == "tbody":
            self._tbody = ident
        elif tag == "tr" and self._tbody:
            self.rows[self._tbody].append([])
        elif tag == "td" and self._tbody:
            self.rows[self._tbody][-1].append("")

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            opened, _ = self._open.pop()
            if opened == tag:
                break
        if tag == "tbody":
            self._tbody = None

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident is not None:
                self.by_id[ident] += data
        if self._tbody and any(tag == "td" for tag, _ in self._open) and self.rows[self._tbody]:
            self.rows[self._tbody][-1][-1] += data


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: .ci/run installs it (apt-get install -y chromium)")
    return found


async def run_chromium(*args: str) -> str:
    """Headless Chromium (as root in CI: no sandbox); its stdout. A throwaway profile each run."""
    profile = Path(tempfile.mkdtemp(prefix="trioprovider-chromium-"))
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        # Virtual time: the page's two-second polls run back to back, so several of them (and
        # their chart points) fit in one run; fetches to the live server still complete.
        "--virtual-time-budget=9000",
        *args,
    ]
    try:
        with trio.fail_after(120):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode()


async def test_dashboard_in_headless_chromium(nursery: trio.Nursery) -> None:
    traffic = await known_traffic(nursery)
    url = f"{traffic.running.provider_url}/dashboard#key={API_KEY}"
    dom = await run_chromium("--window-size=1280,1100", "--dump-dom", url)
    page = _Texts()
    page.feed(dom)
    shown = page.by_id

    assert shown["state"] == "live", shown["state"]
    assert shown["requests-total"] == "7"
    assert shown["requests-successful"] == "3"
    assert shown["requests-failed"] == "1"
    assert shown["requests-cancelled"] == "1"
    assert shown["requests-rate-limited"] == "2"
    assert shown["agents-connected"] == "2"
    assert shown["sessions-active"] == "1"
    assert shown["window"] == "4"
    assert float(shown["p99"]) >= float(shown["p50"]) > 0
    assert shown["cancel-reasons"] == "client_disconnected 1"
    agents = {row[0]: row[1:] for row in page.rows["agents"]}
    assert agents == {"echo": ["echo", "0 / 16"], "slow-echo": ["slow", "0 / 16"]}
    recent = page.rows["recent"]
    assert [row[1] for row in recent] == [
        "rate_limited",
        "rate_limited",
        "error",
        "cancellation (client_disconnected)",
    ]
    assert recent[2][2:5] == ["/v1/chat/completions", "no-such-model", "404 model_not_found"]
    assert SENTINEL not in dom
    # The key went from the address to localStorage: the page never shows it.
    assert API_KEY not in dom.split("<script>")[0]

    # Every poll is a keyed GET of /metrics from the page itself (same origin: Host and Origin pass).
    families = _samples((await get_metrics(traffic.running)).text)
    polls = _value(families["trioprovider_http_requests"], "trioprovider_http_requests_total", route="/metrics", status="200")
    assert polls >= 2

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    await run_chromium("--window-size=1280,1100", f"--screenshot={screenshot}", url)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_the_dashboard_is_one_self_contained_file() -> None:
    from trioprovider.routes.metrics import dashboard_page

    page, policy = dashboard_page()
    assert page.count("<script>") == 1 and page.count("<style>") == 1
    assert "http://" not in page and "https://" not in page
    # Exactly the page's own script and style are allowed to run.
    assert len(re.findall(r"script-src 'sha256-[A-Za-z0-9+/=]+';", policy)) == 1
    assert len(re.findall(r"style-src 'sha256-[A-Za-z0-9+/=]+';", policy)) == 1
