#!/usr/bin/env python3
"""How the server's CPU is shared between decoding and the model, and whether large photos starve
small ones, for several server configurations, interleaved.

For each configuration (rotating order, `--rounds` times) the script starts the release server,
warms it up, and for each concurrency drives it with wrk (closed loop, one body per client) for
`--seconds`. Around each run it reads every server thread's CPU time from /proc and splits it by
thread name: `model-*` threads (the model thread and the threads its runtime starts, OpenVINO's or
libtorch's) against the tokio threads (decoding and resizing on the decode pool, plus the HTTP
work, which is small next to a 12 MP decode). It prints images/s, p50/p99 and both CPU shares.

`--small IMAGE` adds a mixed run per configuration: `--small-clients` clients post the small image
while the concurrency's clients post the photo, at once (two wrk processes). The small image's
latency there, against its latency alone, says whether large decodes hold the threads that small
images queue for.

    python3 benches/decode_share.py --bin target/release/visionserve --model weights/tf_efficientnet_lite0 \\
        --photo target/bench-photos/photo_12mp.jpg --small target/test-data/photos/rocket.jpg \\
        --config default= --config draft='--jpeg-draft' --concurrency 8,32 --rounds 3

A configuration is NAME=[bin=PATH] [server flags]: `bin=` runs another build of the server (to
compare a change with the build before it in one pass).
"""

import argparse
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LUA = r"""
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
done = function(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, flags):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--model", f"m={model}", "--device", "cpu",
             "--max-queue-images", "1024", "--max-concurrent-requests", "1024"] + flags,
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"server exited:\n{self.log.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit("server not ready in 300 s")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1/classify"

    def cpu_by_group(self):
        """CPU seconds so far, per thread group: model (model-*) and tokio (decode pool + HTTP)."""
        tick = os.sysconf("SC_CLK_TCK")
        groups = {"model": 0.0, "tokio": 0.0, "other": 0.0}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            fields = stat[stat.rindex(")") + 2:].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            group = "model" if comm.startswith("model-") else "tokio" if comm.startswith("tokio") else "other"
            groups[group] += seconds
        return groups

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(url, body, clients, seconds, lua):
    command = ["wrk", "-t", str(min(clients, 4)), "-c", str(clients), "-d", f"{seconds}s", "--timeout", "30s",
               "-s", lua, url]
    return subprocess.Popen(command, env={**os.environ, "WRK_BODY": str(body)}, stdout=subprocess.PIPE, text=True)


def wrk_result(proc):
    out, _ = proc.communicate()
    line = next((l for l in out.splitlines() if l.startswith("WRKJSON ")), None)
    if line is None:
        sys.exit(f"wrk printed no summary:\n{out[-2000:]}")
    r = json.loads(line[len("WRKJSON "):])
    return {"rate": r["requests"] / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1e3,
            "p99": r["p99_us"] / 1e3, "errors": r["errors"]}


def measure(server, args, lua, clients, mixed):
    """One run at `clients` photo clients (plus the small image's clients when `mixed`)."""
    before, t0 = server.cpu_by_group(), time.time()
    photo = wrk(server.url, args.photo, clients, args.seconds, lua)
    small = wrk(server.url, args.small, args.small_clients, args.seconds, lua) if mixed else None
    row = {"photo": wrk_result(photo)}
    if small:
        row["small"] = wrk_result(small)
    after, wall = server.cpu_by_group(), time.time() - t0
    used = {g: (after[g] - before[g]) / wall for g in after}
    total = sum(used.values())
    row["cpu"] = total
    row["model_share"] = used["model"] / total if total else 0.0
    return row


def run_config(args, lua, flags):
    binary = args.bin
    if flags and flags[0].startswith("bin="):
        binary, flags = flags[0][len("bin="):], flags[1:]
    server = Server(binary, args.model, flags)
    try:
        warm = wrk(server.url, args.photo, 4, 3, lua)
        wrk_result(warm)
        rows = {}
        if args.small:
            alone = wrk(server.url, args.small, args.small_clients, args.seconds, lua)
            rows["small alone"] = {"small": wrk_result(alone)}
        for c in args.concurrency:
            rows[f"c{c}"] = measure(server, args, lua, c, mixed=False)
            if args.small:
                rows[f"c{c}+small"] = measure(server, args, lua, c, mixed=True)
        return rows
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/visionserve")
    parser.add_argument("--model", required=True)
    parser.add_argument("--photo", required=True, help="the large photo the clients post")
    parser.add_argument("--small", help="a small image, posted alone and beside the photo's clients")
    parser.add_argument("--small-clients", type=int, default=2)
    parser.add_argument("--config", action="append", required=True, help="NAME=[server flags]")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    configs = [(name, shlex.split(flags)) for name, _, flags in (c.partition("=") for c in args.config)]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA)
        lua = f.name
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    print(f"CPU: {cpu.group(1) if cpu else '?'}, {os.cpu_count()} CPUs; photo {args.photo}; small {args.small}",
          flush=True)
    results = {name: [] for name, _ in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, flags in order:
            rows = run_config(args, lua, flags)
            results[name].append(rows)
            print(f"round {r + 1} {name}: " + "; ".join(
                f"{run} " + ", ".join(f"{k} {v['rate']:.1f}/s p50 {v['p50']:.0f} p99 {v['p99']:.0f} ms"
                                      for k, v in row.items() if isinstance(v, dict))
                + (f", cpu {row['cpu']:.2f} model {row['model_share']:.0%}" if "cpu" in row else "")
                for run, row in rows.items()), flush=True)
    print("\nmedians over rounds: images/s, p50 and p99 ms; CPU used (cores) and the model threads' share of it")
    print("| config | run | photo img/s | photo p50 | photo p99 | small img/s | small p50 | small p99 | CPU | model share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _ in configs:
        for run in results[name][0]:
            def med(kind, key):
                values = [rows[run][kind][key] for rows in results[name] if kind in rows[run]]
                return f"{statistics.median(values):.1f}" if values else ""

            def med_top(key, fmt):
                values = [rows[run][key] for rows in results[name] if key in rows[run]]
                return fmt.format(statistics.median(values)) if values else ""
            print(f"| {name} | {run} | {med('photo', 'rate')} | {med('photo', 'p50')} | {med('photo', 'p99')} | "
                  f"{med('small', 'rate')} | {med('small', 'p50')} | {med('small', 'p99')} | "
                  f"{med_top('cpu', '{:.2f}')} | {med_top('model_share', '{:.0%}')} |")


if __name__ == "__main__":
    main()
