#!/usr/bin/env python3
"""The model alone on each runtime, interleaved: visionserve's openvino backend, OpenVINO's own
Python API on the very graph the backend compiles (`visionserve export`), and visionserve's
torch backend, at the same batch sizes and threads. Prints every round, then per model and batch
size the medians and two ratios: openvino backend / OpenVINO's Python API (the overhead of our
path around the same compiled graph; issue 24 asks for at least 0.95) and openvino / torch.

    python3 benches/model_runtimes.py --bin target/release/visionserve \\
        --model weights/tf_efficientnet_lite0 --model 'DIR?input_size=384' --rounds 3

Each round runs every model on every runtime, the runtimes in a different order each round, so
that the host's drift hits them alike. The rows come from benches/model.rs (`cargo bench`) and
benches/openvino_alone.py.
"""
import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ["openvino", "openvino-python", "torch"]


def rows(output):
    """| arch | runtime | input | threads | batch | images/s | ms/batch | -> {batch: images/s}"""
    found = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[4].isdigit():
            found[int(cells[4])] = float(cells[5])
    return found


def run(command):
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return rows(result.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=str(REPO / "target" / "release" / "visionserve"))
    parser.add_argument("--model", action="append", required=True, help="a folder, optionally ?input_size=N")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--out", default=str(REPO / "target" / "bench-runtimes"))
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    graphs = {}
    for model in args.model:
        folder, _, query = model.partition("?")
        size = dict(p.split("=", 1) for p in query.split("&") if p).get("input_size")
        name = Path(folder).name + (f"-{size}" if size else "")
        graph = Path(args.out) / f"{name}.onnx"
        subprocess.run([args.bin, "export", model, "-o", str(graph)], check=True, capture_output=True)
        graphs[model] = (name, folder, size, graph)

    results = {}  # (name, runtime, batch) -> [images/s per round]
    for round_ in range(args.rounds):
        order = RUNTIMES[round_ % len(RUNTIMES):] + RUNTIMES[:round_ % len(RUNTIMES)]
        for model, (name, folder, size, graph) in graphs.items():
            for runtime in order:
                common = ["--batch-sizes", args.batch_sizes, "--threads", str(args.threads),
                          "--seconds", str(args.seconds)]
                if runtime == "openvino-python":
                    precision = "f32" if args.dtype == "f32" else "bf16"
                    got = run([sys.executable, "benches/openvino_alone.py", "--onnx", str(graph),
                               "--precision", precision] + common)
                else:
                    got = run(["cargo", "bench", "-q", "--bench", "model", "--", "--model", folder,
                               "--backend", runtime, "--dtype", args.dtype]
                              + (["--input-size", size] if size else []) + common)
                for batch, rate in got.items():
                    results.setdefault((name, runtime, batch), []).append(rate)
                print(f"round {round_ + 1}: {name:<28} {runtime:<16} "
                      + "  ".join(f"b{b} {r:.1f}" for b, r in sorted(got.items())), flush=True)

    median = statistics.median
    print()
    print(f"| model | batch | openvino backend | OpenVINO Python | torch backend | openvino / Python | openvino / torch |")
    print("|---|---|---|---|---|---|---|")
    for _, (name, *_rest) in graphs.items():
        for batch in sorted({b for (n, _, b) in results if n == name}):
            ours, python, torch = (median(results[(name, r, batch)]) for r in RUNTIMES)
            # Ratios per round, then their median: drift between rounds cancels.
            vs_python = median(a / b for a, b in zip(results[(name, "openvino", batch)],
                                                     results[(name, "openvino-python", batch)]))
            vs_torch = median(a / b for a, b in zip(results[(name, "openvino", batch)],
                                                    results[(name, "torch", batch)]))
            print(f"| {name} | {batch} | {ours:.1f} | {python:.1f} | {torch:.1f} | {vs_python:.2f} | {vs_torch:.2f} |")
    print()
    print(f"(images/s, medians of {args.rounds} interleaved rounds, {args.threads} threads, {args.dtype};"
          f" ratios: medians of the per-round ratios)")


if __name__ == "__main__":
    main()
