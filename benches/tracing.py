#!/usr/bin/env python3
"""What OpenTelemetry tracing costs: the server with no `--otlp-endpoint` against the server
exporting every request (`--trace-sample-ratio 1`) to an OTLP/gRPC sink, interleaved.

Each round starts, in turn (the order alternates between rounds), a fresh server without and
with tracing, and drives it with `visionserve bench` (closed loop, /v1, one photo) at the given
concurrency. The sink is a gRPC server in this process that accepts every
`opentelemetry.proto.collector.trace.v1.TraceService/Export` call and discards it (it counts
the calls and bytes, to show the spans did leave). Prints every round, then the medians and
the ratio traced / off of images/s and of the p50 and p99 latency.

    python3 benches/tracing.py --bin target/release/visionserve --model weights/tf_efficientnet_lite0 \\
        --image target/test-data/photos/rocket.jpg --rounds 5 --concurrency 32

Needs grpcio (the tests/clients venv has it).
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import start_server  # noqa: E402


class Sink:
    """An OTLP/gRPC trace endpoint that answers every Export with an empty (valid) response."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self.lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(
                self.export, request_deserializer=None, response_serializer=None)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def export(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
            self.bytes += len(request)
        return b""  # ExportTraceServiceResponse with no fields set

    def taken(self):
        with self.lock:
            return self.calls, self.bytes


def bench(binary, url, image, concurrency, seconds, max_windows):
    """images/s, p50 and p99 ms of one `visionserve bench` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.csv")
        subprocess.run([binary, "bench", url, image, "--concurrency", str(concurrency),
                        "--duration", str(seconds), "--max-windows", str(max_windows), "-o", out],
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            (row,) = list(csv.DictReader(f))
    rate, cores = float(row["throughput"]), float(row["server_cpu_cores"] or "nan")
    # CPU per image is steadier than images/s when other work shares the machine.
    return {"rate": rate, "p50": float(row["p50_ms"]), "p99": float(row["p99_ms"]),
            "cpu_ms": 1e3 * cores / rate, "errors": int(row["errors"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--max-windows", type=int, default=4)
    args = parser.parse_args()

    sink = Sink()
    endpoint = f"http://127.0.0.1:{sink.port}"
    base = ["--host", "127.0.0.1", "--grpc-port", "0", "--model", f"lite0={args.model}"]
    configs = [("off", []), ("traced", ["--otlp-endpoint", endpoint, "--trace-sample-ratio", "1"])]
    results = {name: [] for name, _ in configs}
    for round_ in range(1, args.rounds + 1):
        order = configs if round_ % 2 else configs[::-1]
        for name, flags in order:
            before = sink.taken()
            proc, url = start_server(args.bin, base + flags)
            try:
                run = bench(args.bin, url, args.image, args.concurrency, args.seconds, args.max_windows)
            finally:
                proc.terminate()
                proc.wait(60)  # the exporter flushes on exit
            calls, sent = (a - b for a, b in zip(sink.taken(), before))
            results[name].append(run)
            print(f"round {round_}: {name:<6} {run['rate']:.1f} images/s  p50 {run['p50']:.1f} ms"
                  f"  p99 {run['p99']:.1f} ms  server CPU {run['cpu_ms']:.2f} ms/image  errors {run['errors']}"
                  f"  exported {calls} calls, {sent / 1e6:.2f} MB", flush=True)
            if name == "traced" and calls == 0:
                sys.exit("the traced server exported nothing: is the sink reachable?")

    keys = ("rate", "p50", "p99", "cpu_ms")
    median = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    print()
    print(f"medians of {args.rounds} rounds, {args.concurrency} clients:")
    print()
    print("| configuration | images/s | p50 ms | p99 ms | server CPU ms/image |")
    print("|---|---|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m['rate']:.1f} | {m['p50']:.1f} | {m['p99']:.1f} | {m['cpu_ms']:.2f} |")
    off, on = median["off"], median["traced"]
    print("| traced / off | " + " | ".join(f"x{on[k] / off[k]:.3f}" for k in keys) + " |")
    # Each round's own ratio: the two runs of a round saw about the same machine.
    paired = [t["rate"] / o["rate"] for o, t in zip(results["off"], results["traced"])]
    paired_cpu = [t["cpu_ms"] / o["cpu_ms"] for o, t in zip(results["off"], results["traced"])]
    print(f"\nthroughput cost of tracing: {100 * (1 - on['rate'] / off['rate']):.1f} % (medians);"
          f" per-round ratios traced/off: median x{statistics.median(paired):.3f}"
          f" ({', '.join(f'{r:.2f}' for r in paired)})")
    print(f"server CPU per image traced/off: median of per-round ratios x{statistics.median(paired_cpu):.3f}")


if __name__ == "__main__":
    main()
