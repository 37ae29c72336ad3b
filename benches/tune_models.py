#!/usr/bin/env python3
"""`visionserve tune` once per model, then what it chose against the defaults in an interleaved pass
(issue #28's BENCHMARKS figures).

For each model: `visionserve tune --model M --p99-ms P --concurrency C --time-budget B` (timed), then
rounds that each start a fresh server with the defaults and one from the written visionserve.toml, in
alternating order, and measure both with `visionserve bench` at the given concurrencies. Prints the
choice, the search's time, each round, and the medians with the per-round ratios.

    python3 benches/tune_models.py --binary target/release/visionserve --out target/tune \\
        --images target/test-data/photos/rocket.jpg --model lite0=weights/tf_efficientnet_lite0:400 \\
        --time-budget 5m --concurrency 32 --rounds 3

A --model is NAME=SOURCE:P99_MS (the target, in ms, at --concurrency).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from serving import start_server
from pathlib import Path


def bench(binary, base, images, concurrencies, window):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([binary, "bench", base, *images, "--concurrency", concurrencies, "--warmup", str(window),
                        "--duration", str(window), "--max-windows", "5", "-o", out.name],
                       capture_output=True, text=True, check=True)
        return json.load(open(out.name))["results"]


def measure(binary, server_args, images, concurrencies, window):
    proc, base = start_server(binary, server_args)
    try:
        return bench(binary, base, images, concurrencies, window)
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--model", action="append", required=True, help="NAME=SOURCE:P99_MS")
    parser.add_argument("--time-budget", default="5m")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--compare", default="8,32", help="concurrencies of the interleaved comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=4.0)
    args = parser.parse_args()
    summary = []
    for spec in args.model:
        named, p99 = spec.rsplit(":", 1)
        name, source = named.split("=", 1)
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        tuned = subprocess.run([args.binary, "tune", "--model", named, "--p99-ms", p99, "--concurrency",
                                str(args.concurrency), "--time-budget", args.time_budget, "--out-dir", str(out),
                                *args.images], capture_output=True, text=True)
        took = time.time() - started
        if tuned.returncode != 0:
            sys.exit(f"tune {name} failed:\n{tuned.stderr[-3000:]}")
        print(f"== {name}: tune took {took:.0f} s\n{tuned.stdout}", flush=True)
        configs = {"defaults": ["--model", named], "tuned": ["--config", str(out / "visionserve.toml")]}
        rows = {c: [] for c in configs}
        for round_ in range(args.rounds):
            order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
            for config in order:
                levels = measure(args.binary, configs[config], args.images, args.compare, args.window)
                rows[config].append(levels)
                cells = "  ".join(f"c={l['concurrency']}: {l['throughput']:6.1f} resp/s p99 {l['p99_ms']:7.1f} ms"
                                  for l in levels)
                print(f"round {round_ + 1} {config:>8}: {cells}", flush=True)
        choice = [l for l in (out / "visionserve.toml").read_text().splitlines() if l and not l.startswith("#")]
        summary.append((name, p99, took, choice, rows))
    print(f"\n| model | p99 target at c={args.concurrency} | tune took | chose | "
          + " | ".join(f"c={c}: defaults / tuned resp/s (p99 ms), tuned/defaults" for c in args.compare.split(",")) + " |")
    print("|---|---|---|---|" + "---|" * len(args.compare.split(",")))
    for name, p99, took, choice, rows in summary:
        cells = []
        for i, c in enumerate(args.compare.split(",")):
            d = [r[i] for r in rows["defaults"]]
            t = [r[i] for r in rows["tuned"]]
            ratio = statistics.median(tt["throughput"] / dd["throughput"] for dd, tt in zip(d, t))
            med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
            cells.append(f"{med(d, 'throughput'):.1f} ({med(d, 'p99_ms'):.0f}) / {med(t, 'throughput'):.1f} "
                         f"({med(t, 'p99_ms'):.0f}), {ratio:.2f}x")
        chose = ", ".join(l.replace(" = ", "=") for l in choice if not l.startswith("[") and not l.startswith("source"))
        print(f"| {name} | {p99} ms | {took:.0f} s | {chose} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
