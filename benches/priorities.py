#!/usr/bin/env python3
"""Request priorities under a flood (issue #27, part 5): does a trickle of high-priority requests
keep its latency while a low-priority flood far beyond capacity hits the same model?

Per round, for each server configuration, interleaved:
- `idle`: the trickle alone (`visionserve bench --rate R`, open loop, Poisson arrivals) against
  the idle server: its p50/p99 are the reference;
- `flood`: the same trickle while a flood (`visionserve bench --concurrency C`, closed loop,
  `Priority: 2`) keeps the model saturated; the flood's 429s are read from the server's metrics.

The configurations: `one level` (no priorities: the trickle queues behind the flood, today's
behaviour) and `two levels` (`--priority-levels 2`, the trickle at level 1, the flood at level 2,
whose share of the queue is `--priority-queue-images` 's second value). Prints every round, then
the medians and the trickle's p99 under the flood over its idle p99.

    python3 benches/priorities.py --binary target/release/visionserve \\
        --model weights/tf_efficientnet_lite0 --photo target/test-data/photos/rocket.jpg --rounds 3
"""

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from serving import start_server

CONFIGS = {
    "one level": [],
    "two levels": ["--priority-levels", "2", "--priority-queue-images", "256,32"],
    # The lever for the high level's wait: shorter batches end sooner, at some cost to the flood.
    "two, batch 2": ["--priority-levels", "2", "--priority-queue-images", "256,32", "--max-batch-size", "2"],
}


def bench(binary, base, photo, load, header, window, windows, out=None, wait=True):
    args = [binary, "bench", base, photo, *load, "--warmup", "1", "--duration", str(window),
            "--max-windows", str(windows), "--threads", "1", "--header", header]
    if out:
        args += ["-o", out]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench failed: {err[-2000:]}")
    return proc


def counters(base):
    """(requests refused as overloaded, requests answered) so far."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    total = lambda pattern: sum(float(v) for v in re.findall(pattern, text))
    return (total(r'visionserve_request_failures_total\{[^}]*reason="overloaded"[^}]*\} (\S+)'),
            total(r'visionserve_requests_total\{[^}]*outcome="success"[^}]*\} (\S+)'))


def trickle(binary, base, photo, rate, window, windows):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        bench(binary, base, photo, ["--rate", str(rate)], "Priority: 1", window, windows, out.name)
        level = json.load(open(out.name))["results"][0]
    return {k: level[k] for k in ("throughput", "p50_ms", "p99_ms", "errors")}


def measure(binary, model, photo, extra, args):
    proc, base = start_server(binary, ["--model", f"lite0={model}", *extra])
    try:
        idle = trickle(binary, base, photo, args.rate, args.window, args.windows)
        before = counters(base)
        flood = bench(binary, base, photo, ["--concurrency", str(args.flood)], "Priority: 2",
                      args.window, 100, wait=False)
        time.sleep(3)  # the flood saturates the model first
        started = time.time()
        loaded = trickle(binary, base, photo, args.rate, args.window, args.windows)
        after = counters(base)
        refused = after[0] - before[0]
        # What the flood got: answers while the trickle ran, less the trickle's own.
        loaded["flood_rps"] = (after[1] - before[1]) / (time.time() - started) - loaded["throughput"]
        flood.terminate()
        flood.wait()
        return idle, loaded, refused
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--photo", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=4.0, help="the trickle's requests per second")
    parser.add_argument("--flood", type=int, default=64, help="the flood's clients")
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()

    rows = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            idle, loaded, refused = measure(args.binary, args.model, args.photo, CONFIGS[name], args)
            rows[name].append((idle, loaded, refused))
            print(f"round {round_ + 1} {name:12}: idle p50 {idle['p50_ms']:.1f} p99 {idle['p99_ms']:.1f} ms | "
                  f"under flood p50 {loaded['p50_ms']:.1f} p99 {loaded['p99_ms']:.1f} ms, "
                  f"trickle errors {loaded['errors']}, flood {loaded['flood_rps']:.1f} answers/s and {refused:.0f} 429s",
                  flush=True)
    print("\nmedians (trickle at level 1, flood at level 2):")
    for name, runs in rows.items():
        med = lambda pick: statistics.median(pick(r) for r in runs)
        ratio = statistics.median(r[1]["p99_ms"] / r[0]["p99_ms"] for r in runs)
        print(f"  {name:12}: idle p99 {med(lambda r: r[0]['p99_ms']):.1f} ms, under flood p99 "
              f"{med(lambda r: r[1]['p99_ms']):.1f} ms (p50 {med(lambda r: r[1]['p50_ms']):.1f}), "
              f"ratio {ratio:.2f}x, flood {med(lambda r: r[1]['flood_rps']):.1f} answers/s, 429s {med(lambda r: r[2]):.0f}")


if __name__ == "__main__":
    main()
