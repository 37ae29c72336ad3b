#!/usr/bin/env python3
"""Where a lone client's time goes: one keep-alive connection posting one photo after another to a
running server, the client's own latency against the server's `Server-Timing` stages (medians).

    python3 benches/latency_breakdown.py --url http://127.0.0.1:3000/v1/classify \\
        --image target/test-data/photos/rocket.jpg --requests 300

Prints the median of the client's latency, of each stage (decode, preprocess, queue, inference,
total), of the client's latency minus the server's total (HTTP both ways, reading the body before
the server's clock starts, the client itself) and of the total minus its stages (the hand-offs
between threads). Issue #9's 1-client target allows 1 ms over decode + resize + the model's
batch-1 time; this says which part of the excess is whose.

Before and after: start two servers (two builds, or two sets of flags) on two ports and give
both URLs. Each round then sends `--requests` requests to each in turn, in a rotated order, one
server at a time (the other idles), and the summary gives each server's medians over the rounds
of each round's medians, and the per-round difference to the first URL:

    python3 benches/latency_breakdown.py --url http://127.0.0.1:3001/v1/classify \\
        --url http://127.0.0.1:3002/v1/classify --image PHOTO --requests 200 --rounds 5

Standard library only.
"""

import argparse
import http.client
import re
import statistics
import time
import urllib.parse

STAGE = re.compile(r"(\w+);dur=([0-9.]+)")
STAGES = ("decode", "preprocess", "queue", "inference", "total")
median = statistics.median


def timed_requests(target, body, content_type, count):
    """`count` requests on one keep-alive connection: [(client ms, {stage: ms})]."""
    url = urllib.parse.urlsplit(target)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    rows = []
    for _ in range(count):
        started = time.perf_counter()
        # no-store: with --cache-bytes, the same photo again would be a cache hit, not a request.
        conn.request("POST", path, body, {"Content-Type": content_type, "Cache-Control": "no-store"})
        response = conn.getresponse()
        response.read()
        client_ms = (time.perf_counter() - started) * 1e3
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status} from {target}")
        stages = {k: float(v) for k, v in STAGE.findall(response.getheader("Server-Timing", ""))}
        missing = [s for s in STAGES if s not in stages]
        if missing:
            raise SystemExit(f"no {', '.join(missing)} in Server-Timing: {response.getheader('Server-Timing')!r}")
        rows.append((client_ms, stages))
    conn.close()
    return rows


def summary(rows):
    """Medians of one batch of requests: {figure: ms}."""
    figures = {"client": median(c for c, _ in rows)}
    for stage in STAGES:
        figures[stage] = median(s[stage] for _, s in rows)
    figures["client-total"] = median(c - s["total"] for c, s in rows)
    figures["total-stages"] = median(
        s["total"] - s["decode"] - s["preprocess"] - s["queue"] - s["inference"] for _, s in rows)
    return figures


NOTES = {"client-total": "(HTTP both ways, the client)", "total-stages": "(hand-offs between threads)"}


def print_figures(figures, indent="  "):
    for name, value in figures.items():
        print(f"{indent}{name:13s} {value:7.2f} ms  {NOTES.get(name, '')}".rstrip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", action="append", help="repeat to compare servers (default: http://127.0.0.1:3000/v1/classify)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--content-type", default="image/jpeg")
    parser.add_argument("--requests", type=int, default=300, help="per server and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20, help="requests sent to each server first and not counted")
    args = parser.parse_args()
    urls = args.url or ["http://127.0.0.1:3000/v1/classify"]
    body = open(args.image, "rb").read()

    for url in urls:
        timed_requests(url, body, args.content_type, args.warmup)
    rounds = {url: [] for url in urls}
    for r in range(args.rounds):
        order = urls[r % len(urls):] + urls[:r % len(urls)]
        for url in order:
            figures = summary(timed_requests(url, body, args.content_type, args.requests))
            rounds[url].append(figures)
            if len(urls) > 1 or args.rounds > 1:
                print(f"round {r + 1} {url}: client {figures['client']:.2f} ms, total-stages "
                      f"{figures['total-stages']:.2f} ms, client-total {figures['client-total']:.2f} ms", flush=True)

    for url in urls:
        print(f"{args.requests} requests x {args.rounds} round(s), one at a time, to {url} ({args.image}): "
              + ("medians" if args.rounds == 1 else "medians over rounds of each round's medians"))
        print_figures({name: median(f[name] for f in rounds[url]) for name in rounds[url][0]})
    for url in urls[1:]:
        print(f"{url} minus {urls[0]}, per round [median]:")
        for name in ("client", "client-total", "total-stages"):
            diffs = [b[name] - a[name] for a, b in zip(rounds[urls[0]], rounds[url])]
            listed = ", ".join(f"{d:+.2f}" for d in diffs)
            print(f"  {name:13s} [{listed}] [{median(diffs):+.2f}] ms")


if __name__ == "__main__":
    main()
