"""``python -m bench``: trioprovider against its floor, its ceiling and a peer, in one run.

Everything starts here, on loopback, each server in a fresh process and every client in
another: the mock upstream (floor), a bare Hypercorn-Trio app (ceiling), trioprovider with the
echo agent and with the upstream agent in front of the mock, and the LiteLLM proxy in front of
the mock. The machine is shared and noisy, so the comparisons run interleaved (round by round,
each scenario on every target in turn, the order rotating) and are reported as medians over
rounds; the ratios the targets are stated in are measured once more from back-to-back pairs of
short runs of the two targets compared. Results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import percentile
from bench.processes import ROOT, HeldStreams, Server, python_module, run_client
from bench.report import write_report
from bench.targets import Target, all_targets


@dataclass(frozen=True)
class Plan:
    rounds: int
    latency_count: int
    duration: float
    throughput_levels: tuple[int, ...]
    streaming_levels: tuple[int, ...]
    probes: int
    #: Hang-ups in progress at once: few enough that the probes alone do not saturate the
    #: server (each is a new connection and request), so the figure is cancellation latency,
    #: not queueing.
    probe_concurrency: int
    memory_steps: tuple[int, ...]
    #: Back-to-back pairs of short runs for each ratio a target is stated in, and their length.
    pairs: int
    pair_duration: float


FULL = Plan(3, 500, 3.0, (1, 10, 20, 50, 200), (1, 50, 500), 1000, 10, (250, 500, 750, 1000), 20, 1.0)
QUICK = Plan(1, 200, 1.0, (1, 10, 20, 50, 200), (1, 50, 500), 1000, 20, (1000,), 3, 0.5)
SMOKE = Plan(1, 20, 0.3, (1, 20), (1, 50), 20, 10, (50,), 1, 0.2)

#: The ratios the issue's targets are stated in: (scenario, concurrency, ours, theirs). Not
#: 500 streams: there one wave of answers outlasts a short run, which then measures how the
#: wave starts rather than the steady rate; that ratio comes from the rounds' longer runs.
PAIRED = [
    ("throughput", 20, "trioprovider-echo", "ceiling"),
    ("throughput", 20, "trioprovider-echo", "litellm"),
    ("throughput", 20, "trioprovider-upstream", "litellm"),
    ("streaming", 1, "trioprovider-echo", "ceiling"),
    ("streaming", 50, "trioprovider-echo", "ceiling"),
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary(samples: list[float]) -> dict[str, float]:
    """Median and p99 of seconds, in milliseconds."""
    return {"p50_ms": percentile(samples, 0.5) * 1e3, "p99_ms": percentile(samples, 0.99) * 1e3, "n": len(samples)}


class Run:
    def __init__(self, plan: Plan, targets: list[Target], logs: Path) -> None:
        self.plan = plan
        self.targets = targets
        self.logs = logs
        self.results: dict[str, Any] = {"plan": plan.__dict__, "machine": machine(), "targets": {}, "skipped": {}}

    def client_options(self, target: Target, server: Server, pace: str) -> dict[str, Any]:
        return {"model": target.model(pace, server), "api_key": server.info.get("api_key", "none")}

    # -- phase 1: latency, throughput, streaming, interleaved ---------------------------------

    def speed(self) -> None:
        plan = self.plan
        mock = Server("upstream-fast", python_module("bench.mock_upstream"), self.logs)
        servers: dict[str, Server] = {}
        try:
            for target in self.targets:
                log(f"starting {target.name}")
                servers[target.name] = target.start("fast", mock.url, self.logs)
            scenarios: list[tuple[str, dict[str, Any]]] = [("latency", {"count": plan.latency_count, "warmup": 30})]
            scenarios += [("throughput", {"concurrency": c, "duration": plan.duration}) for c in plan.throughput_levels]
            scenarios += [("streaming", {"concurrency": c, "duration": plan.duration}) for c in plan.streaming_levels]
            rounds: list[dict[str, dict[str, Any]]] = []
            for number in range(plan.rounds):
                this_round: dict[str, dict[str, Any]] = {}
                for index, (scenario, options) in enumerate(scenarios):
                    key = scenario if scenario == "latency" else f"{scenario}@{options['concurrency']}"
                    shift = (number + index) % len(self.targets)
                    order = self.targets[shift:] + self.targets[:shift]
                    for target in order:
                        server = servers[target.name]
                        cpu_before = server.cpu()
                        result = run_client(scenario, server.url, **options, **self.client_options(target, server, "fast"))
                        result["server_cpu"] = server.cpu() - cpu_before
                        this_round.setdefault(target.name, {})[key] = result
                    log(f"round {number + 1}/{plan.rounds}: {key} " + "  ".join(
                        f"{name}={_headline(this_round[name][key])}" for name in (t.name for t in self.targets)
                    ))
                rounds.append(this_round)
            self._aggregate_speed(rounds)
            self._pairs(servers)
        finally:
            for server in [*servers.values(), mock]:
                server.stop()

    def _aggregate_speed(self, rounds: list[dict[str, dict[str, Any]]]) -> None:
        for target in self.targets:
            out = self.results["targets"].setdefault(target.name, {"description": target.description})
            keys = rounds[0][target.name].keys()
            for key in keys:
                per_round = [r[target.name][key] for r in rounds]
                if key == "latency":
                    samples = [s for r in per_round for s in r["samples"]]
                    out["latency"] = {
                        **summary(samples),
                        "p50_rounds_ms": [percentile(r["samples"], 0.5) * 1e3 for r in per_round],
                        "errors": sum(r["errors"] for r in per_round),
                        "server_cpu_us_per_request": statistics.median(r["server_cpu"] / len(r["samples"]) * 1e6 for r in per_round),
                    }
                elif key.startswith("throughput"):
                    concurrency = int(key.split("@")[1])
                    samples = [s for r in per_round for s in r["samples"]]
                    out.setdefault("throughput", {})[str(concurrency)] = {
                        "rps": statistics.median(r["rps"] for r in per_round),
                        "rps_rounds": [r["rps"] for r in per_round],
                        **summary(samples),
                        "errors": sum(r["errors"] for r in per_round),
                        "client_cpu": max(r["client_cpu"] for r in per_round),
                        "server_cpu_us_per_request": statistics.median(r["server_cpu"] / max(1, r["requests"]) * 1e6 for r in per_round),
                    }
                else:
                    concurrency = int(key.split("@")[1])
                    out.setdefault("streaming", {})[str(concurrency)] = {
                        "chunks_per_s": statistics.median(r["chunks_per_s"] for r in per_round),
                        "chunks_per_s_rounds": [r["chunks_per_s"] for r in per_round],
                        "ttft": summary([s for r in per_round for s in r["ttft"]]),
                        "itl": summary([s for r in per_round for s in r["itl"]]),
                        "streams": sum(r["streams"] for r in per_round),
                        "tokens_per_stream": statistics.median(r["tokens_per_stream"] for r in per_round),
                        "errors": sum(r["errors"] for r in per_round),
                        "client_cpu": max(r["client_cpu"] for r in per_round),
                        "server_cpu_us_per_chunk": statistics.median(r["server_cpu"] / max(1, r["tokens"]) * 1e6 for r in per_round),
                    }
        self.results["rounds"] = [
            {name: {key: _headline_value(result) for key, result in scenarios.items()} for name, scenarios in r.items()}
            for r in rounds
        ]

    def _pairs(self, servers: dict[str, Server]) -> None:
        """Each target ratio again, from short runs of its two targets back to back (ours then
        theirs, then theirs then ours, so that a drift weighs on both alike). The machine's speed
        swings within seconds: the same server, run after run, took 48 to 76 us of CPU a chunk
        for the same work, so two runs a few seconds and three other targets apart (a round)
        compare the moments as much as the servers."""
        by_name = {target.name: target for target in self.targets}
        paired = self.results.setdefault("pairs", {})
        levels = {"throughput": self.plan.throughput_levels, "streaming": self.plan.streaming_levels}
        for scenario, concurrency, ours, theirs in PAIRED:
            if ours not in servers or theirs not in servers or concurrency not in levels[scenario]:
                continue
            key = f"{scenario}@{concurrency}"
            ratios: list[float] = []
            for number in range(self.plan.pairs):
                rates: dict[str, float] = {}
                for name in (ours, theirs) if number % 2 == 0 else (theirs, ours):
                    server = servers[name]
                    options = {"concurrency": concurrency, "duration": self.plan.pair_duration}
                    rates[name] = _headline_value(run_client(scenario, server.url, **options, **self.client_options(by_name[name], server, "fast")))
                if rates[theirs]:
                    ratios.append(rates[ours] / rates[theirs])
            if not ratios:
                continue
            low, median, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
            paired.setdefault(key, {})[f"{ours}/{theirs}"] = {"ratios": ratios, "median": median, "q1": low, "q3": high}
            log(f"pairs: {key} {ours}/{theirs} median {median:.2f} (quartiles {low:.2f}-{high:.2f}, {len(ratios)} pairs)")

    # -- phase 2: cancellation ----------------------------------------------------------------

    def cancellation(self) -> None:
        plan = self.plan
        for target in self.targets:
            if target.name == "ceiling":
                continue  # a bare app has no agent or upstream to tell
            mock = Server("upstream-slow", python_module("bench.mock_upstream"), self.logs)
            server = mock if target.name == "floor" else target.start("slow", mock.url, self.logs)
            try:
                log(f"cancellation: {target.name}, {plan.probes} hang-ups")
                before = server.stats() if server.info.get("api_key") else None
                result = run_client("cancellation", server.url, count=plan.probes, concurrency=plan.probe_concurrency, **self.client_options(target, server, "slow"))
                echo = target.name == "trioprovider-echo"
                source = server if echo else mock
                stats = _settled(source, plan.probes, "cancels" if echo else "hangups")
                arrived = {key: at for key, at in stats["cancels" if echo else "hangups"]}
                delays = [arrived[p["request_id" if echo else "marker"]] - p["hung_up"] for p in result["probes"] if p["request_id" if echo else "marker"] in arrived]
                entry = {
                    "measured_at": "model_cancel at the echo agent" if echo else "the upstream connection closing at the mock",
                    "hangups": len(result["probes"]),
                    "seen": len(delays),
                    "errors": result["errors"],
                    **summary(delays),
                }
                if before is not None:
                    after = _drained(server)
                    entry["leak_check"] = {
                        "open_scopes": after["open_scopes"],
                        "in_flight": after["in_flight"],
                        "queued": after["queued"],
                        "active_requests": after["active_requests"],
                        "tasks_before": before["tasks"],
                        "tasks_after": after["tasks"],
                        "rss_before": before["rss"],
                        "rss_after": after["rss"],
                    }
                self.results["targets"].setdefault(target.name, {"description": target.description})["cancellation"] = entry
                log(f"cancellation: {target.name}: p50 {entry['p50_ms']:.2f} ms p99 {entry['p99_ms']:.2f} ms ({len(delays)}/{len(result['probes'])} seen)")
            finally:
                if server is not mock:
                    server.stop()
                mock.stop()

    # -- phase 3: memory -----------------------------------------------------------------------

    def memory(self) -> None:
        plan = self.plan
        for target in self.targets:
            mock = Server("upstream-hold", python_module("bench.mock_upstream"), self.logs) if target.proxy else None
            server = target.start("hold", mock.url if mock else "", self.logs)
            try:
                options = self.client_options(target, server, "hold")
                # Warm: the first streams import and build what any later one needs.
                warm = HeldStreams(server.url, [10], **options)
                warm.wait_step()
                warm.finish()
                time.sleep(1.0)
                idle = server.rss()
                points = [{"streams": 0, "rss": idle}]
                held = HeldStreams(server.url, list(plan.memory_steps), **options)
                refused = stalled = 0
                for step in plan.memory_steps:
                    state = held.wait_step()
                    refused, stalled = state["refused"], state["stalled"]
                    time.sleep(0.5)
                    points.append({"streams": state["open"], "rss": server.rss()})
                    if step != plan.memory_steps[-1]:
                        held.next_step()
                held.finish()
                time.sleep(1.0)
                top = points[-1]
                entry: dict[str, Any] = {
                    "idle_rss": idle,
                    "points": points,
                    "refused": refused,
                    "stalled": stalled,
                    "bytes_per_stream": (top["rss"] - idle) / top["streams"] if top["streams"] else None,
                    "rss_after_close": server.rss(),
                }
                if server.info.get("api_key"):
                    entry["after_close"] = _drained(server)
                self.results["targets"].setdefault(target.name, {"description": target.description})["memory"] = entry
                log(f"memory: {target.name}: idle {idle / 2**20:.1f} MiB, {top['streams']} streams {top['rss'] / 2**20:.1f} MiB")
            except RuntimeError as error:
                self.results["targets"].setdefault(target.name, {"description": target.description})["memory_error"] = str(error)[:500]
                log(f"memory: {target.name} failed: {error}")
            finally:
                server.stop()
                if mock is not None:
                    mock.stop()


def _headline(result: dict[str, Any]) -> str:
    value = _headline_value(result)
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def _headline_value(result: dict[str, Any]) -> float:
    if "rps" in result:
        return float(result["rps"])
    if "chunks_per_s" in result:
        return float(result["chunks_per_s"])
    return percentile(result["samples"], 0.5) * 1e3


def _settled(server: Server, expected: int, key: str, timeout: float = 10.0) -> dict[str, Any]:
    """Stats once ``expected`` entries under ``key`` have arrived (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if len(stats[key]) >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _drained(server: Server, timeout: float = 10.0) -> dict[str, Any]:
    """trioprovider's stats once no request is open any more (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if (stats["open_scopes"] == 0 and stats["in_flight"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one round, short scenarios (about 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="a few requests per scenario (seconds; checks the bench runs)")
    parser.add_argument("--targets", help="comma-separated subset of: floor, ceiling, trioprovider-echo, trioprovider-upstream, litellm")
    parser.add_argument("--phases", default="speed,cancellation,memory", help="comma-separated subset of: speed, cancellation, memory")
    parser.add_argument("--install-litellm", action="store_true", help="install the LiteLLM proxy into bench/.venv-litellm if missing")
    parser.add_argument("--merge", action="store_true", help="update the figures of the phases run in an existing results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where results go (default bench/results)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    wanted = set(args.targets.split(",")) if args.targets else None
    targets, skipped = [], {}
    for target in all_targets(install_litellm=args.install_litellm):
        if wanted is not None and target.name not in wanted:
            continue
        if target.unavailable:
            skipped[target.name] = target.unavailable
            log(f"skipping {target.name}: {target.unavailable}")
        else:
            targets.append(target)
    logs = args.out / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    run = Run(plan, targets, logs)
    started = time.monotonic()
    if args.merge and (args.out / "results.json").exists():
        previous = json.loads((args.out / "results.json").read_text())
        run.results["targets"] = previous["targets"]
        run.results["rounds"] = previous.get("rounds", [])
        run.results["pairs"] = previous.get("pairs", {})
        started -= previous.get("duration_s", 0)
    run.results["skipped"] = skipped
    run.results["mode"] = "smoke" if args.smoke else "quick" if args.quick else "full"
    for phase in ("speed", "cancellation", "memory"):
        if phase in args.phases.split(","):
            getattr(run, phase)()
            # Written after every phase: a later failure keeps what was measured.
            run.results["duration_s"] = time.monotonic() - started
            write_report(run.results, args.out)
            (args.out / "results.json").write_text(json.dumps(run.results, indent=1) + "\n")
    log(f"done in {run.results['duration_s']:.0f}s: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
