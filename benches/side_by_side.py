#!/usr/bin/env python3
"""Several models served by one process, all under load at once, for several server
configurations, interleaved (the configurations run in a rotated order each round).

Each round starts one server per configuration with every `--model` and drives all of them at
once with `benches/http.rs --model a,b,...` (each model its own closed-loop clients posting one
photo). Prints every round, then per configuration and concurrency the medians over rounds of
each model's images/s and p99, and of the total images/s; and the per-round ratio of each
configuration's total to the first configuration's, with its median.

    python3 benches/side_by_side.py --image target/test-data/photos/rocket.jpg \\
        --model lite0=weights/tf_efficientnet_lite0 --model b0=PATH --model nano=PATH \\
        --config default= --config one='--instances 1' --rounds 3

A configuration is NAME=[ENV=VALUE ...] [--server-flag ...], as in benches/levers.py.
"""

import argparse
import statistics

from levers import cargo_bench, cells, http_row, parse_config


def side_by_side(models, image, concurrency, seconds, env, flags):
    """{concurrency: {model: {rate, p50, p99, batch, errors}}} for one server with every model."""
    names = [name for name, _ in models]
    server = []
    for name, path in models:
        server += ["--model", f"{name}={path}"]
    rows = cargo_bench(
        "http",
        ["--image", image, "--concurrency", ",".join(map(str, concurrency)), "--seconds", str(seconds),
         "--model", ",".join(names), "--server", "--device", "cpu"] + server + flags,
        env,
    )
    out = {}
    for r in rows:
        c = cells(r)
        if c[0] == "protocol":
            continue
        # The first cell is V1:model (V1 alone with one model).
        model = c[0].split(":", 1)[1] if ":" in c[0] else names[0]
        out.setdefault(int(c[1]), {})[model] = http_row(c)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR (repeat)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--config", action="append", default=[], help="NAME=[ENV=V ...] [--flag ...]")
    parser.add_argument("--concurrency", default="1,8", help="clients per model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    args = parser.parse_args()
    models = [tuple(m.split("=", 1)) for m in args.model]
    configs = [parse_config(c) for c in (args.config or ["default="])]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    names = [name for name, _ in models]

    results = {name: [] for name, _, _ in configs}
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(configs)
        for name, env, flags in configs[shift:] + configs[:shift]:
            run = side_by_side(models, args.image, concurrency, args.seconds, env, flags)
            results[name].append(run)
            for c in concurrency:
                line = "  ".join(
                    f"{m} {run[c][m]['rate']:.1f}/s p99 {run[c][m]['p99']:.0f} b{run[c][m]['batch']:.2f}"
                    + (f" ERR {run[c][m]['errors']}" if run[c][m]["errors"] else "")
                    for m in names
                )
                total = sum(run[c][m]["rate"] for m in names)
                print(f"round {round_}: {name:<10} c{c}: total {total:.1f}/s  {line}", flush=True)

    median = statistics.median
    print()
    for c in concurrency:
        print(f"{c} clients per model (medians of {args.rounds} rounds): images/s, p99 ms")
        print("| configuration | total images/s | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for name, _, _ in configs:
            runs = [r[c] for r in results[name]]
            total = median(sum(run[m]["rate"] for m in names) for run in runs)
            per_model = [f"{median(run[m]['rate'] for run in runs):.1f}, p99 {median(run[m]['p99'] for run in runs):.0f}"
                         for m in names]
            print(f"| {name} | {total:.1f} | " + " | ".join(per_model) + " |")
        first = configs[0][0]
        for name, _, _ in configs[1:]:
            ratios = [sum(b[c][m]["rate"] for m in names) / sum(a[c][m]["rate"] for m in names)
                      for a, b in zip(results[first], results[name])]
            print(f"  {name} / {first}, total, per round: [{', '.join(f'{r:.2f}' for r in ratios)}],"
                  f" median {median(ratios):.2f}x")
        print()


if __name__ == "__main__":
    main()
