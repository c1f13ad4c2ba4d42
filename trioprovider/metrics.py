"""Metrics: what the provider has done, for Prometheus (``GET /metrics``) and for people (its JSON
form and the ``/dashboard`` page).

Fed by a few hooks, each called once per HTTP request or model request (never per chunk):

- :meth:`Metrics.http_finished`: route template, status and duration of every HTTP request;
- :meth:`Metrics.model_request_ended`: a model request's scope closed (outcome, tokens, time to
  first token, and for a stopped request how long its ``model_cancel`` took to go out);
- :meth:`Metrics.model_request_refused`: refused before it ran (429 rate limits, 503, ...).

The counters and histograms the hooks feed are plain numbers (:mod:`trioprovider.tallies`), made
into Prometheus families at scrape time; what is a state rather than an event (sessions,
streams, agents) is read at scrape time from a :class:`Live` snapshot. Each Provider has its own ``CollectorRegistry``: several servers run in
one test process, and the global registry would mix them up.

The pure cores (:func:`percentile`, :class:`LatencyWindow`, :class:`RateMeter`, :class:`CpuMeter`)
take the time as an argument and are tested without I/O.
"""

from __future__ import annotations

import datetime as dt
import math
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from trioprovider.protocol import AgentInfo
from trioprovider.scope import RequestScope
from trioprovider.tallies import CounterTally, HistogramTally

#: Model requests whose latencies the JSON percentiles are computed from.
WINDOW_SIZE = 1000
#: Errors and cancellations kept for the dashboard.
RECENT_EVENTS = 50
#: Seconds over which the JSON's rates (requests and tokens per second) are averaged.
RATE_HORIZON = 60
#: The route label of requests that matched no route (their raw paths would be unbounded labels).
UNMATCHED_ROUTE = "unmatched"
#: The status label of requests whose client left before any response started (nginx's 499).
CLIENT_CLOSED = 499
#: Methods that get their own label; anything else a client invents is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Answers take from milliseconds (echo) to minutes (a coding agent thinking).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, math.inf)
# Stopping an agent should take a millisecond or so; a second is already far too slow.
CANCEL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, math.inf)


# -- pure cores ----------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ascending ``ordered``; 0 if empty."""
    if not ordered:
        return 0.0
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]


def distribution_ms(values: Iterable[float]) -> dict[str, float]:
    """Average and p50/p95/p99 of ``values`` (seconds), in milliseconds, rounded to 0.1 ms."""
    ordered = sorted(values)
    average = sum(ordered) / len(ordered) if ordered else 0.0
    return {
        "avg": round(average * 1000, 1),
        "p50": round(percentile(ordered, 50) * 1000, 1),
        "p95": round(percentile(ordered, 95) * 1000, 1),
        "p99": round(percentile(ordered, 99) * 1000, 1),
    }


@dataclass
class LatencyWindow:
    """The durations and times to first token of the last ``size`` model requests."""

    size: int = WINDOW_SIZE
    durations: deque[float] = field(init=False)
    first_tokens: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.durations = deque(maxlen=self.size)
        self.first_tokens = deque(maxlen=self.size)

    def add(self, duration: float, first_token: float | None) -> None:
        self.durations.append(duration)
        if first_token is not None:
            self.first_tokens.append(first_token)

    def summary(self) -> dict[str, dict[str, float]]:
        return {"response": distribution_ms(self.durations), "first_token": distribution_ms(self.first_tokens)}


class RateMeter:
    """Amounts per second over the last ``horizon`` seconds, in one-second buckets (O(1) per add)."""

    def __init__(self, horizon: int = RATE_HORIZON, start: float = 0.0) -> None:
        self.horizon = horizon
        self.start = start
        self._buckets = [0.0] * horizon
        self._seconds = [-1] * horizon  # which whole second each bucket holds

    def add(self, now: float, amount: float = 1.0) -> None:
        second = math.floor(now)
        slot = second % self.horizon
        if self._seconds[slot] != second:
            self._seconds[slot], self._buckets[slot] = second, 0.0
        self._buckets[slot] += amount

    def rate(self, now: float) -> float:
        """Per second, over the horizon (or over the time since ``start`` if that is shorter)."""
        second = math.floor(now)
        total = sum(
            amount
            for held, amount in zip(self._seconds, self._buckets)
            if second - self.horizon < held <= second
        )
        span = min(float(self.horizon), now - self.start)
        return total / span if span > 0 else 0.0


class CpuMeter:
    """CPU use of this process, in percent of one core, between successive samples."""

    def __init__(self, wall: float, cpu: float) -> None:
        self._wall, self._cpu = wall, cpu

    def sample(self, wall: float, cpu: float) -> float:
        elapsed = wall - self._wall
        used = cpu - self._cpu
        if elapsed <= 0:
            return 0.0
        self._wall, self._cpu = wall, cpu
        return round(100 * used / elapsed, 1)


def parse_vmrss_mb(status_text: str) -> float | None:
    """``VmRSS`` from the text of ``/proc/<pid>/status``, in MiB (None if absent)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            kib = float(line.split()[1])
            return kib / 1024
    return None


def resident_memory_mb() -> float:
    """This process's resident memory in MiB: VmRSS on Linux, else the peak from getrusage."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            found = parse_vmrss_mb(status.read())
    except OSError:
        found = None
    if found is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        found = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return round(found, 1)


def outcome_kind(outcome: str) -> str:
    """``successful``, ``failed`` or ``cancelled`` for a RequestScope's outcome."""
    if outcome == "completed":
        return "successful"
    if outcome == "failed":
        return "failed"
    return "cancelled"


def cancel_reason(outcome: str) -> str:
    """The reason of a stopped request, as its ``model_cancel`` said it."""
    return "client_disconnected" if outcome == "cancelled" else outcome


# -- the metrics of one provider -----------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """What the provider holds right now (read at scrape time)."""

    sessions_active: int
    sessions_created: int
    sessions_expired: int
    active_requests: int
    active_streams: int
    agents: list[AgentInfo]


@dataclass
class _Totals:
    successful: int = 0
    failed: int = 0
    cancelled: int = 0
    rate_limited: int = 0
    #: Model requests that ran (had a RequestScope), whatever their outcome.
    ran: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancel_seconds: float = 0.0
    cancels_timed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class _TallyCollector(Collector):
    """The request path's counters and histograms, as metric families (at scrape time)."""

    def __init__(self, tallies: Sequence[CounterTally | HistogramTally]) -> None:
        self.tallies = tallies

    def collect(self) -> Iterator[Metric]:
        for tally in self.tallies:
            yield tally.family()


class _LiveCollector(Collector):
    """The gauges (and session counters) that are read from the provider at scrape time."""

    def __init__(self, live: Callable[[], Live]) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        live = self.live()
        yield GaugeMetricFamily("trioprovider_sessions_active", "Live sessions.", value=live.sessions_active)
        yield CounterMetricFamily(
            "trioprovider_sessions_created", "Sessions created since start.", value=live.sessions_created
        )
        yield CounterMetricFamily(
            "trioprovider_sessions_expired",
            "Sessions ended by expiry or idleness since start.",
            value=live.sessions_expired,
        )
        yield GaugeMetricFamily(
            "trioprovider_active_requests", "Model requests running now.", value=live.active_requests
        )
        yield GaugeMetricFamily(
            "trioprovider_active_streams", "Streamed model requests running now.", value=live.active_streams
        )
        yield GaugeMetricFamily("trioprovider_agents_connected", "Agents connected to the bridge.", value=len(live.agents))
        in_flight = GaugeMetricFamily(
            "trioprovider_agent_in_flight", "Requests each connected agent is answering.", labels=["agent"]
        )
        for agent in live.agents:
            in_flight.add_metric([agent.agent_id], agent.in_flight)
        yield in_flight


#: Refusals that come before the model's name is known to be served: not a label value.
UNCHECKED_MODEL_CODES = frozenset({"model_not_found", "no_agent", "invalid_request"})


class Metrics:
    """The counters and histograms of one provider, and the summaries built from them."""

    def __init__(self, live: Callable[[], Live], *, window: int = WINDOW_SIZE) -> None:
        self.live = live
        self.registry = CollectorRegistry()
        self.started_at = time.monotonic()
        r = self.registry
        self._http_requests = CounterTally(
            "trioprovider_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
        )
        self._http_duration = HistogramTally(
            "trioprovider_http_request_duration_seconds",
            "HTTP request duration to the last byte of the answer, by route template.",
            ["route"],
            DURATION_BUCKETS,
        )
        self._model_requests = CounterTally(
            "trioprovider_model_requests",
            "Model requests by outcome: completed, failed, cancelled, rate_limited, refused.",
            ["model", "outcome"],
        )
        self._model_duration = HistogramTally(
            "trioprovider_model_request_duration_seconds",
            "Model request duration, from admission to the agent's last reply.",
            ["model"],
            DURATION_BUCKETS,
        )
        self._first_token = HistogramTally(
            "trioprovider_time_to_first_token_seconds",
            "From admission to the agent's first reply.",
            ["model"],
            DURATION_BUCKETS,
        )
        self._tokens = CounterTally(
            "trioprovider_tokens",
            "Tokens processed: input (prompt) and output (completion).",
            ["model", "direction"],
        )
        self._cancellations = CounterTally(
            "trioprovider_cancellations",
            "Model requests stopped before their answer ended, by reason (model_cancel's reason).",
            ["reason"],
        )
        self._cancel_latency = HistogramTally(
            "trioprovider_cancel_propagation_seconds",
            "From the client's disconnect (or the request starting to stop) to model_cancel sent to the agent.",
            [],
            CANCEL_BUCKETS,
        )
        self._rate_limited = CounterTally(
            "trioprovider_rate_limited_requests",
            "Model requests refused with 429, by limit.",
            ["limit"],
        )
        r.register(
            _TallyCollector(
                [
                    self._http_requests,
                    self._http_duration,
                    self._model_requests,
                    self._model_duration,
                    self._first_token,
                    self._tokens,
                    self._cancellations,
                    self._cancel_latency,
                    self._rate_limited,
                ]
            )
        )
        ProcessCollector(registry=r)
        r.register(_LiveCollector(live))

        self._totals = _Totals()
        self._window = LatencyWindow(window)
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._request_rate = RateMeter(start=self.started_at)
        self._token_rate = RateMeter(start=self.started_at)
        self._cpu = CpuMeter(self.started_at, time.process_time())

    # -- hooks -----------------------------------------------------------------------------------

    def http_finished(self, method: str, route: str | None, status: int | None, seconds: float) -> None:
        """An HTTP request ended (its last byte sent, or its client gone)."""
        method = method if method in METHODS else "other"
        route = route or UNMATCHED_ROUTE
        status = status if status is not None else CLIENT_CLOSED
        self._http_requests.inc((method, route, str(status)))
        self._http_duration.observe((route,), seconds)

    def model_request_ended(self, scope: RequestScope, *, route: str | None, disconnected_at: float | None) -> None:
        """A model request's scope closed; ``disconnected_at``: when its client left, if it did."""
        totals = self._totals
        totals.ran += 1
        model = scope.invoke.model
        finished = scope.finished_at if scope.finished_at is not None else scope.started_at
        duration = max(0.0, finished - scope.started_at)
        first_token = None
        if scope.first_token_at is not None and (scope.usage is not None or scope.translator.completion_tokens):
            first_token = scope.first_token_at - scope.started_at
            self._first_token.observe((model,), first_token)
        self._model_duration.observe((model,), duration)
        self._window.add(duration, first_token)

        # The usage the client was told (the agent's own count, when it gave one); for an answer
        # that never finished, the provider's estimate of what was streamed.
        if scope.usage is not None:
            prompt, completion = scope.usage.prompt_tokens, scope.usage.completion_tokens
        else:
            prompt, completion = scope.translator.prompt_tokens, scope.translator.completion_tokens
        totals.prompt_tokens += prompt
        totals.completion_tokens += completion
        if prompt:
            self._tokens.inc((model, "input"), prompt)
        if completion:
            self._tokens.inc((model, "output"), completion)
        now = time.monotonic()
        self._request_rate.add(now)
        self._token_rate.add(now, prompt + completion)

        kind = outcome_kind(scope.outcome)
        if kind == "successful":
            totals.successful += 1
            self._model_requests.inc((model, "completed"))
            return
        if kind == "failed":
            totals.failed += 1
            self._model_requests.inc((model, "failed"))
            self._note("error", route, model, scope.invoke.id, code=scope.error_code)
            return
        totals.cancelled += 1
        reason = cancel_reason(scope.outcome)
        totals.by_reason[reason] = totals.by_reason.get(reason, 0) + 1
        self._model_requests.inc((model, "cancelled"))
        self._cancellations.inc((reason,))
        if scope.cancel_sent_at is not None:
            began = scope.stopping_at if scope.stopping_at is not None else scope.cancel_sent_at
            if disconnected_at is not None:
                began = min(began, disconnected_at)
            took = max(0.0, scope.cancel_sent_at - began)
            self._cancel_latency.observe((), took)
            totals.cancel_seconds += took
            totals.cancels_timed += 1
        self._note("cancellation", route, model, scope.invoke.id, code=scope.error_code, reason=reason)

    def model_request_refused(self, model: str, status: int, code: str | None, *, route: str | None, request_id: str) -> None:
        """A model request refused before it ran: 429 (rate or session limits), 503, 404, ..."""
        self._request_rate.add(time.monotonic())
        # Refused before its name was found in the catalog: as a label, a client could make a
        # new series (kept for good) with every made-up name. The bounded recent list keeps it.
        label = "unknown" if code in UNCHECKED_MODEL_CODES else model
        if status == 429:
            self._totals.rate_limited += 1
            self._rate_limited.inc((code or "rate_limit_exceeded",))
            self._model_requests.inc((label, "rate_limited"))
            self._note("rate_limited", route, model, request_id, code=code, status=status)
        else:
            self._totals.failed += 1
            self._model_requests.inc((label, "refused"))
            self._note("error", route, model, request_id, code=code, status=status)

    def _note(self, kind: str, route: str | None, model: str, request_id: str, **details: Any) -> None:
        # Identifiers and codes only: never prompt or answer text.
        self._recent.append(
            {
                "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                "kind": kind,
                "route": route or UNMATCHED_ROUTE,
                "model": model,
                "request_id": request_id,
                **{name: value for name, value in details.items() if value is not None},
            }
        )

    # -- what is read ----------------------------------------------------------------------------

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The Prometheus text exposition (or OpenMetrics, if ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def summary(self) -> dict[str, Any]:
        """The JSON form: the seed's sections, plus what the dashboard shows."""
        live = self.live()
        totals = self._totals
        now = time.monotonic()
        processed = totals.prompt_tokens + totals.completion_tokens
        latency = self._window.summary()
        response, first = latency["response"], latency["first_token"]
        return {
            "uptime_seconds": round(now - self.started_at, 3),
            "sessions": {
                "active": live.sessions_active,
                "total_created": live.sessions_created,
                "total_expired": live.sessions_expired,
            },
            "requests": {
                "total": totals.successful + totals.failed + totals.cancelled + totals.rate_limited,
                "successful": totals.successful,
                "failed": totals.failed,
                "rate_limited": totals.rate_limited,
                "cancelled": totals.cancelled,
                "active": live.active_requests,
                "active_streams": live.active_streams,
                "per_second": round(self._request_rate.rate(now), 3),
            },
            "performance": {
                "window_requests": len(self._window.durations),
                "avg_response_time_ms": response["avg"],
                "p50_response_time_ms": response["p50"],
                "p95_response_time_ms": response["p95"],
                "p99_response_time_ms": response["p99"],
                "avg_time_to_first_token_ms": first["avg"],
                "p50_time_to_first_token_ms": first["p50"],
                "p95_time_to_first_token_ms": first["p95"],
                "p99_time_to_first_token_ms": first["p99"],
                "memory_usage_mb": resident_memory_mb(),
                "cpu_usage_percent": self._cpu.sample(now, time.process_time()),
            },
            "tokens": {
                "total_processed": processed,
                "prompt": totals.prompt_tokens,
                "completion": totals.completion_tokens,
                "avg_tokens_per_request": round(processed / totals.ran, 1) if totals.ran else 0.0,
                "tokens_per_second": round(self._token_rate.rate(now), 3),
            },
            "cancellations": {
                "total": totals.cancelled,
                "by_reason": dict(sorted(totals.by_reason.items())),
                "avg_disconnect_to_cancel_ms": (
                    round(totals.cancel_seconds / totals.cancels_timed * 1000, 2) if totals.cancels_timed else 0.0
                ),
            },
            "agents": [
                {
                    "agent_id": agent.agent_id,
                    "models": [card.id for card in agent.models],
                    "max_concurrency": agent.max_concurrency,
                    "in_flight": agent.in_flight,
                }
                for agent in live.agents
            ],
            "recent": list(reversed(self._recent)),
        }
