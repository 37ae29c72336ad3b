#!/usr/bin/env python3
"""The response cache's gain at a realistic repeat rate: the server without and with `--cache-bytes`, interleaved.

Each round runs, in turn, the server with no cache and then with `--cache-bytes` (a fresh server
each time, so each starts cold), both under `benches/http.rs --repeat-ratio`: closed-loop /v1
clients of which about 30 % of requests repeat, byte for byte, a variant of the photo already
answered earlier in the run, and the rest post a new variant (the same pixels with a unique JPEG
comment). Prints every round, then the medians and, per concurrency, the ratio cache / no cache
of images/s and of the p50 latency.

    python3 benches/cache.py --model weights/tf_efficientnet_lite0 --image target/test-data/photos/rocket.jpg --rounds 3

`repeated` is the fraction of requests that repeated a variant, `cached` the fraction of
responses that said `"cached": true` (the hits; 0 without the cache).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from levers import end_to_end  # noqa: E402  (the same `cargo bench` driver and table parser)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, help="a JPEG")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--repeat-ratio", type=float, default=0.3)
    parser.add_argument("--cache-bytes", default="256MiB")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    configs = [("no-cache", []), ("cache", ["--cache-bytes", args.cache_bytes])]

    results = {name: [] for name, _ in configs}
    for round_ in range(1, args.rounds + 1):
        for name, flags in configs:
            e2e = end_to_end(args.model, args.image, concurrency, args.seconds, {}, flags,
                             client_args=["--repeat-ratio", str(args.repeat_ratio)])
            results[name].append(e2e)
            line = "  ".join(
                f"c{c} {e2e[c]['rate']:.1f}/s p50 {e2e[c]['p50']:.1f} p99 {e2e[c]['p99']:.1f} b{e2e[c]['batch']:.2f}"
                f" rep {e2e[c]['repeated']:.2f} hit {e2e[c]['cached']:.2f}"
                + (f" ERR {e2e[c]['errors']}" if e2e[c]["errors"] else "")
                for c in concurrency
            )
            print(f"round {round_}: {name:<9} {line}", flush=True)

    median = {
        name: {c: {k: statistics.median(r[c][k] for r in results[name]) for k in ("rate", "p50", "p99", "cached")}
               for c in concurrency}
        for name, _ in configs
    }
    print()
    print(f"medians of {args.rounds} rounds, repeat ratio {args.repeat_ratio}, cache {args.cache_bytes}:")
    print()
    header = " | ".join(f"{c} clients: images/s p50/p99 ms (cached)" for c in concurrency)
    print(f"| configuration | {header} |")
    print("|---|" + "---|" * len(concurrency))
    for name, _ in configs:
        row = [f"{m['rate']:.1f} {m['p50']:.1f}/{m['p99']:.1f} ({m['cached']:.2f})"
               for m in (median[name][c] for c in concurrency)]
        print(f"| {name} | " + " | ".join(row) + " |")
    row = [f"images/s x{median['cache'][c]['rate'] / median['no-cache'][c]['rate']:.2f}, "
           f"p50 x{median['cache'][c]['p50'] / median['no-cache'][c]['p50']:.2f}" for c in concurrency]
    print("| cache / no-cache | " + " | ".join(row) + " |")
    if all(median["cache"][c]["cached"] == 0 for c in concurrency):
        print("\nno response said \"cached\": true: does this server have the response cache?")


if __name__ == "__main__":
    main()
