#!/usr/bin/env python3
"""Decode + resize/crop per image, ours against Pillow + timm's transform, interleaved.

Each round runs `cargo bench --bench preprocess` (ours: whole, and as --jpeg-draft decodes) and
`benches/pillow_preprocess.py` (Pillow whole, and with its own `Image.draft`) on the same photos
and model config, then, with `--baseline BIN`, an earlier build of the preprocess bench (to show
the whole-image path is no slower than before). The order rotates each round. Prints every
round, the medians of each column, and per photo, round by round then as a median:

- exact: Pillow's decode + resize over ours (whole images);
- draft: Pillow's draft() + resize over ours with --jpeg-draft (the issue's target: >= 1.5x);
- draft vs exact: our whole path over our draft path.

    python3 benches/preprocess_vs_pillow.py --image target/bench-photos/photo_12mp.jpg \\
        --model weights/tf_efficientnet_lite0 --rounds 3 [--baseline /tmp/preprocess-old]
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


# glibc's allocator tuned as the server tunes it (src/backend/device.rs, tune_allocator), for every
# tool alike: with glibc's defaults each whole decode maps fresh pages for its output, and the page
# faults were a third of a 12 MP decode's time, for us and for Pillow.
SERVER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def table(command):
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **SERVER_MALLOC})
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")
    rows = [line for line in result.stdout.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, *body = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    return {row[0]: dict(zip(header, row)) for row in body}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", action="append", required=True)
    parser.add_argument("--model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--baseline", help="an earlier build of the preprocess bench binary")
    args = parser.parse_args()
    images = sum((["--image", i] for i in args.image), [])
    model = ["--model", args.model] if args.model else []
    runs = ["--runs", str(args.runs)]
    tools = {
        "ours": ["cargo", "bench", "-q", "--bench", "preprocess", "--"] + images + model + runs,
        "pillow": [sys.executable, str(HERE / "pillow_preprocess.py")] + images + model + runs,
    }
    if args.baseline:
        tools["baseline"] = [args.baseline, "--bench"] + images + model + runs
    names = list(tools)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            results[name].append(table(tools[name]))
        print(f"round {r + 1}: " + ", ".join(
            f"{name} " + "; ".join(f"{photo} {row['decode ms']}+{row['resize+crop ms']} / draft "
                                   f"{row.get('draft decode ms', '-')}+{row.get('draft resize+crop ms', '-')}"
                                   for photo, row in results[name][-1].items())
            for name in names), flush=True)

    def total(row, draft):
        prefix = "draft " if draft else ""
        return float(row[f"{prefix}decode ms"]) + float(row[f"{prefix}resize+crop ms"])

    print("\n| photo | tool | size | decode ms | resize+crop ms | draft scale | draft decode ms | draft resize+crop ms |")
    print("|---|---|---|---|---|---|---|---|")
    for photo in results["ours"][0]:
        for name in names:
            rows = [rounds[photo] for rounds in results[name] if photo in rounds and "draft decode ms" in rounds[photo]]
            if not rows:
                rows = [rounds[photo] for rounds in results[name]]
                cols = ["decode ms", "resize+crop ms"]
                med = {c: statistics.median(float(r[c]) for r in rows) for c in cols}
                print(f"| {photo} | {name} | {rows[0]['size']} | {med['decode ms']:.2f} | {med['resize+crop ms']:.2f} | | | |")
                continue
            cols = ["decode ms", "resize+crop ms", "draft decode ms", "draft resize+crop ms"]
            med = {c: statistics.median(float(r[c]) for r in rows) for c in cols}
            print(f"| {photo} | {name} | {rows[0]['size']} | {med['decode ms']:.2f} | {med['resize+crop ms']:.2f} | "
                  f"{rows[0]['draft scale']} | {med['draft decode ms']:.2f} | {med['draft resize+crop ms']:.2f} |")
    print()
    for photo in results["ours"][0]:
        pairs = list(zip(results["ours"], results["pillow"]))
        exact = [total(p[photo], False) / total(o[photo], False) for o, p in pairs]
        draft = [total(p[photo], True) / total(o[photo], True) for o, p in pairs]
        ours_gain = [total(o[photo], False) / total(o[photo], True) for o, _ in pairs]
        line = (f"{photo}: exact {statistics.median(exact):.2f}x Pillow ({', '.join(f'{x:.2f}' for x in exact)}); "
                f"draft {statistics.median(draft):.2f}x Pillow's draft ({', '.join(f'{x:.2f}' for x in draft)}); "
                f"our draft {statistics.median(ours_gain):.2f}x our exact")
        if "baseline" in results:
            before = [total(b[photo], False) / total(o[photo], False) for o, b in zip(results["ours"], results["baseline"])]
            line += f"; exact path {statistics.median(before):.2f}x the baseline's speed ({', '.join(f'{x:.2f}' for x in before)})"
        print(line)


if __name__ == "__main__":
    main()
