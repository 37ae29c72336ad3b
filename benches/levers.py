#!/usr/bin/env python3
"""The server end to end against the model alone, for several server configurations, interleaved.

Each round runs, in turn: the model alone (`benches/model.rs`, batch 1 and 8: the ceiling) and
then the server (`benches/http.rs`, closed-loop clients posting one photo) under each
configuration, so that the host's drift hits them alike. Prints every round, then the medians
and, per configuration, issue #9's targets computed round by round (each round's server against
that round's model alone, then the median over rounds, so that drift between rounds cancels; drift
within a round, between the model-alone run and the server's, does not, and the configurations run in
a different order each round so that none is always the one nearest the model-alone run):

- images/s at 8 and more clients >= 0.9x the model-alone batch-8 rate (the ceiling);
- 1 client: p50 <= the model's batch-1 time + decoding and resizing the photo for this model
  (`benches/preprocess.rs`, one thread) + 1 ms;
- at the highest concurrency: p99 <= 1.3x p50.

    python3 benches/levers.py --model weights/tf_efficientnet_lite0 --image target/test-data/photos/rocket.jpg \\
        --config default= --config spin=OMP_WAIT_POLICY=ACTIVE --config x2='--instances 2' --rounds 3

`--alone-backend openvino` takes the ceiling from the openvino backend's model alone instead of
libtorch's.

A configuration is NAME=[ENV=VALUE ...] [--server-flag ...]: environment variables for the
server process first, then extra server flags.
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys

ROW = re.compile(r"^\|(.+)\|\s*$")


def cargo_bench(name, args, env=None):
    command = ["cargo", "bench", "-q", "--bench", name, "--"] + args
    result = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return [line for line in result.stdout.splitlines() if ROW.match(line) and not line.startswith("|---")]


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def model_alone(model, seconds, dtype, backend="torch"):
    rows = cargo_bench("model", ["--model", model, "--batch-sizes", "1,8", "--seconds", str(seconds), "--dtype", dtype,
                                 "--backend", backend])
    # | arch | backend | input | threads | batch | images/s | ms/batch |
    alone = {int(cells(r)[4]): float(cells(r)[5]) for r in rows}
    # The batch-1 time to two decimals (images/s is printed to one, too coarse for slow models).
    alone["b1_ms"] = next(float(cells(r)[6]) for r in rows if int(cells(r)[4]) == 1)
    return alone


def preprocess_ms(model, image):
    """Decoding plus resizing and cropping `image` for `model`, one thread, milliseconds."""
    rows = cargo_bench("preprocess", ["--image", image, "--model", model])
    # | photo | size | decode ms | resize+crop ms |
    c = cells(rows[-1])
    return float(c[2]) + float(c[3])


def end_to_end(model, image, concurrency, seconds, env, flags, dtype="f32", client_args=()):
    """The server under `flags` (and `env`), driven by `benches/http.rs` (plus `client_args`):
    per concurrency, images/s, errors, p50/p99 ms and the mean batch, and with `--repeat-ratio`
    also the fractions of repeated and cached answers."""
    rows = cargo_bench(
        "http",
        ["--image", image, "--concurrency", ",".join(map(str, concurrency)), "--seconds", str(seconds)]
        + list(client_args)
        + ["--server", "--model", f"m={model}", "--device", "cpu", "--dtype", dtype] + flags,
        env,
    )
    return {int(c[1]): http_row(c) for c in map(cells, rows) if c[0] != "protocol"}


def http_row(c):
    """One row of benches/http.rs's table, as cells:
    | protocol | clients | requests | errors | images/s | p50 | p90 | p99 | mean batch | [repeated | cached |]"""
    row = {"rate": float(c[4]), "errors": int(c[3]), "p50": float(c[5]), "p99": float(c[7]),
           "batch": float(c[8])}
    if len(c) > 10:
        row.update(repeated=float(c[9]), cached=float(c[10]))
    return row


def parse_config(text):
    name, _, rest = text.partition("=")
    env, flags = {}, []
    for word in shlex.split(rest):
        if not flags and "=" in word and not word.startswith("-"):
            key, _, value = word.partition("=")
            env[key] = value
        else:
            flags.append(word)
    return name, env, flags


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--config", action="append", default=[], help="NAME=[ENV=V ...] [--flag ...]")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--model-seconds", type=float, default=4)
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--alone-backend", default="torch", choices=["torch", "openvino"],
                        help="the backend of the model-alone ceiling")
    args = parser.parse_args()
    configs = [parse_config(c) for c in (args.config or ["default="])]
    concurrency = [int(c) for c in args.concurrency.split(",")]

    ceiling, results = [], {name: [] for name, _, _ in configs}
    for round_ in range(1, args.rounds + 1):
        alone = model_alone(args.model, args.model_seconds, args.dtype, args.alone_backend)
        alone["prep"] = preprocess_ms(args.model, args.image)
        ceiling.append(alone)
        print(f"round {round_}: model alone  b1 {alone[1]:.1f}  b8 {alone[8]:.1f} images/s;"
              f" decode+resize {alone['prep']:.2f} ms", flush=True)
        shift = (round_ - 1) % len(configs)
        for name, env, flags in configs[shift:] + configs[:shift]:
            e2e = end_to_end(args.model, args.image, concurrency, args.seconds, env, flags, args.dtype)
            results[name].append(e2e)
            line = "  ".join(
                f"c{c} {e2e[c]['rate']:.1f}/s p50 {e2e[c]['p50']:.1f} p99 {e2e[c]['p99']:.1f} b{e2e[c]['batch']:.2f}"
                + (f" ERR {e2e[c]['errors']}" if e2e[c]["errors"] else "")
                for c in concurrency
            )
            print(f"round {round_}: {name:<12} {line}", flush=True)

    median = statistics.median
    b1 = median(a[1] for a in ceiling)
    b8 = median(a[8] for a in ceiling)
    prep = median(a["prep"] for a in ceiling)
    print()
    print(f"model alone ({args.alone_backend}, median of {args.rounds}): batch 1 {b1:.1f} images/s ({1e3 / b1:.2f} ms), batch 8 {b8:.1f} images/s;"
          f" decode+resize {prep:.2f} ms")
    print()
    header = " | ".join(f"{c} clients: images/s (x ceiling) p50/p99 ms" for c in concurrency)
    print(f"| configuration | {header} |")
    print("|---|" + "---|" * len(concurrency))
    for name, _, _ in configs:
        row = []
        for c in concurrency:
            runs = [r[c] for r in results[name]]
            row.append(f"{median(r['rate'] for r in runs):.1f} ({median(ratios_to_ceiling(results[name], ceiling, c)):.2f}x)"
                       f" {median(r['p50'] for r in runs):.1f}/{median(r['p99'] for r in runs):.1f}")
        print(f"| {name} | " + " | ".join(row) + " |")
    print()
    print("(x ceiling: the median of the per-round ratios to that round's model-alone batch-8 rate)")
    for name, _, _ in configs:
        print()
        print(f"{name}: issue #9's targets, per round, then the median")
        for line in target_lines(results[name], ceiling, concurrency):
            print("  " + line)


def ratios_to_ceiling(rounds, ceiling, c):
    return [r[c]["rate"] / a[8] for r, a in zip(rounds, ceiling)]


def target_lines(rounds, ceiling, concurrency):
    """One line per target of issue #9 that these concurrencies cover: the per-round values, their
    median, and whether the median meets it."""
    def verdict(ok):
        return "met" if ok else "NOT met"

    def listed(values, fmt):
        return ", ".join(fmt.format(v) for v in values)

    lines = []
    if 1 in concurrency:
        # p50 minus its budget: the model's batch-1 time plus decode and resize (+1 ms allowed).
        over = [r[1]["p50"] - (a["b1_ms"] + a["prep"]) for r, a in zip(rounds, ceiling)]
        m = statistics.median(over)
        lines.append(f"1 client, p50 - (model batch 1 + decode + resize) <= 1 ms: {m:+.1f} ms"
                     f" [{listed(over, '{:+.1f}')}] {verdict(m <= 1.0)}")
    for c in (c for c in concurrency if c >= 8):
        ratios = ratios_to_ceiling(rounds, ceiling, c)
        m = statistics.median(ratios)
        lines.append(f"{c} clients, images/s >= 0.9x model alone at batch 8: {m:.2f}x"
                     f" [{listed(ratios, '{:.2f}')}] {verdict(m >= 0.9)}")
    top = max(concurrency)
    if top > 1:
        spread = [r[top]["p99"] / r[top]["p50"] for r in rounds]
        m = statistics.median(spread)
        lines.append(f"{top} clients, p99 <= 1.3x p50: {m:.2f}x [{listed(spread, '{:.2f}')}] {verdict(m <= 1.3)}")
    return lines


if __name__ == "__main__":
    main()
