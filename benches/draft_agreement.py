#!/usr/bin/env python3
"""How far --jpeg-draft moves the scores: each model classifies every photo twice with
`visionserve classify` (whole, then `?jpeg_draft=true`), every class's score, and per photo
size this prints the photos whose top-1 agree and the largest score difference of any class.

    python benches/draft_agreement.py --bin target/release/visionserve \\
        --model lite0=weights/tf_efficientnet_lite0 --model v2s=target/bench-photos/tf_efficientnetv2_s \\
        target/bench-photos/agreement
"""
import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def classify(binary, model, inputs, draft):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.jsonl"
        command = [binary, "classify", "--model", f"{model}?jpeg_draft={'true' if draft else 'false'}",
                   "--top-k", "1000", "-o", str(out)] + [str(i) for i in inputs]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [r for r in rows if "error" in r]
    if failed:
        sys.exit(f"{len(failed)} photos failed: {failed[:3]}")
    return {r["file"]: {p["index"]: p["score"] for p in r["predictions"]} for r in rows}


def size_of(file):
    match = re.search(r"_(\d+mp)\.", Path(file).name)
    return match.group(1) if match else "other"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/visionserve")
    parser.add_argument("--model", action="append", required=True, help="NAME=SOURCE")
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    print("| model | photos | top-1 agreement | largest score difference | mean largest difference | "
          "largest top-1 score difference |")
    print("|---|---|---|---|---|---|")
    for spec in args.model:
        name, source = spec.split("=", 1)
        exact = classify(args.bin, source, args.inputs, draft=False)
        draft = classify(args.bin, source, args.inputs, draft=True)
        groups = collections.defaultdict(list)
        for file, scores in exact.items():
            drafted = draft[file]
            top1 = max(scores, key=scores.get)
            largest = max(abs(scores[c] - drafted.get(c, 0.0)) for c in scores)
            groups[size_of(file)].append((top1 == max(drafted, key=drafted.get), largest,
                                          abs(scores[top1] - drafted.get(top1, 0.0)), file))
        for size, rows in sorted(groups.items()):
            agree = sum(r[0] for r in rows)
            worst = max(rows, key=lambda r: r[1])
            print(f"| {name}, {size} | {len(rows)} | {agree}/{len(rows)} | {worst[1]:.4f} ({Path(worst[3]).name}) | "
                  f"{sum(r[1] for r in rows) / len(rows):.4f} | {max(r[2] for r in rows):.4f} |")
            for disagreement in (r for r in rows if not r[0]):
                print(f"|   top-1 differs: {Path(disagreement[3]).name} | | | {disagreement[1]:.4f} | | |")


if __name__ == "__main__":
    main()
