"""Profile a target under load with py-spy: where its CPU goes, per function.

``python -m bench.profile [--target trioprovider-echo] [--scenario throughput|streaming]
[--concurrency 20] [--seconds 8]`` starts the target in a fresh process, samples it with
``py-spy record`` while a client process loads it, and writes the collapsed stacks and a summary
(self and inclusive time of the busiest functions, the control thread left out) to
``bench/results/profile-<target>-<scenario>.txt``.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import time
from pathlib import Path

from bench.processes import ROOT, run_client
from bench.targets import all_targets


def summarize(collapsed: Path, top: int = 30) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any("answer_stats" in frame or "_thread_cache" in frame for frame in frames):
            continue  # the benchmark's control thread, idle in readline
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples of the server's work", "", "self time:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top * 2)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="trioprovider-echo")
    parser.add_argument("--scenario", choices=["throughput", "streaming"], default="throughput")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    targets = {t.name: t for t in all_targets(install_litellm=False)}
    target = targets[args.target]
    logs = args.out / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    # A proxy needs the mock upstream (the floor) in front of which it stands.
    upstream = targets["floor"].start("fast", "", logs) if target.proxy else None
    server = target.start("fast", upstream.url if upstream else "", logs)
    name = f"profile-{args.target}-{args.scenario}"
    collapsed = logs / f"{name}.collapsed"
    try:
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(server.pid), "--rate", "250", "--format", "raw", "-o", str(collapsed), "--duration", str(int(args.seconds + 1))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        run_client(args.scenario, server.url, concurrency=args.concurrency, duration=args.seconds, model=target.model("fast", server), api_key=server.info.get("api_key", "none"))
        spy.wait(timeout=60)
    finally:
        server.stop()
        if upstream is not None:
            upstream.stop()
    (args.out / f"{name}.txt").write_text(f"{args.target}, {args.scenario} at concurrency {args.concurrency}\n" + summarize(collapsed))
    print(args.out / f"{name}.txt")


if __name__ == "__main__":
    main()
