#!/usr/bin/env python3
"""Where a lone client's time goes: one keep-alive connection posting one photo after another to a
running server, the client's own latency against the server's `Server-Timing` stages (medians).

    python3 benches/latency_breakdown.py --url http://127.0.0.1:3000/v1/classify \\
        --image target/test-data/photos/rocket.jpg --requests 300

Prints the median of the client's latency, of each stage (decode, preprocess, queue, inference,
total), of the client's latency minus the server's total (HTTP both ways, reading the body before
the server's clock starts, the client itself) and of the total minus its stages (the hand-offs
between threads). Issue #9's 1-client target allows 1 ms over decode + resize + the model's
batch-1 time; this says which part of the excess is whose. Standard library only.
"""

import argparse
import http.client
import re
import statistics
import time
import urllib.parse

STAGE = re.compile(r"(\w+);dur=([0-9.]+)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000/v1/classify")
    parser.add_argument("--image", required=True)
    parser.add_argument("--content-type", default="image/jpeg")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="requests sent first and not counted")
    args = parser.parse_args()

    url = urllib.parse.urlsplit(args.url)
    body = open(args.image, "rb").read()
    conn = http.client.HTTPConnection(url.hostname, url.port or 80)
    rows = []
    for i in range(args.warmup + args.requests):
        started = time.perf_counter()
        # no-store: with --cache-bytes, the same photo again would be a cache hit, not a request.
        conn.request("POST", (url.path or "/") + (f"?{url.query}" if url.query else ""), body,
                     {"Content-Type": args.content_type, "Cache-Control": "no-store"})
        response = conn.getresponse()
        response.read()
        client_ms = (time.perf_counter() - started) * 1e3
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status} from {args.url}")
        stages = {k: float(v) for k, v in STAGE.findall(response.getheader("Server-Timing", ""))}
        missing = [s for s in ("decode", "preprocess", "queue", "inference", "total") if s not in stages]
        if missing:
            raise SystemExit(f"no {', '.join(missing)} in Server-Timing: {response.getheader('Server-Timing')!r}")
        if i >= args.warmup:
            rows.append((client_ms, stages))

    median = statistics.median
    print(f"{len(rows)} requests, one at a time, to {args.url} ({args.image}): medians")
    print(f"  client        {median(c for c, _ in rows):7.2f} ms")
    for stage in ("decode", "preprocess", "queue", "inference", "total"):
        print(f"  {stage:13s} {median(s[stage] for _, s in rows):7.2f} ms")
    print(f"  client-total  {median(c - s['total'] for c, s in rows):7.2f} ms  (HTTP both ways, the client)")
    handoffs = [s["total"] - s["decode"] - s["preprocess"] - s["queue"] - s["inference"] for _, s in rows]
    print(f"  total-stages  {median(handoffs):7.2f} ms  (hand-offs between threads)")


if __name__ == "__main__":
    main()
