#!/usr/bin/env python3
"""OpenVINO's own Python API on a graph `visionserve export` wrote: the model alone, timed as
benches/model.rs times visionserve's openvino backend (same batch sizes, threads, precision and
seconds), so that the two print comparable rows.

    python benches/openvino_alone.py --onnx model.onnx --batch-sizes 1,8 --threads 2 --seconds 4

This is the reference the openvino backend is held to: the same compiled graph, with nothing
around it but a Python loop (an f32 input prepared once, `infer` per batch). `--shape` compares
how the batch dimension is compiled: `dynamic` (what the backend does: one compiled model for
every batch size), `static` (one compiled model per batch size) or `bounded` (1 to the largest
batch size given).
"""
import argparse
import time

import numpy as np
import openvino as ov


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument(
        "--hint", default="LATENCY", choices=["LATENCY", "THROUGHPUT"],
        help="PERFORMANCE_HINT (the backend uses LATENCY with one stream per copy)")
    parser.add_argument("--shape", default="dynamic", choices=["dynamic", "static", "bounded"])
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    core = ov.Core()
    model = core.read_model(args.onnx)
    config = {
        "INFERENCE_PRECISION_HINT": args.precision,
        "PERFORMANCE_HINT": args.hint,
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(args.threads),
        "ENABLE_CPU_PINNING": "NO",
        "CPU_DENORMALS_OPTIMIZATION": "YES",
    }
    _, channels, height, width = model.input(0).get_partial_shape()
    height, width = height.get_length(), width.get_length()
    if args.shape == "bounded":
        model.reshape({0: ov.PartialShape([ov.Dimension(1, max(batches)), 3, height, width])})
    compiled = core.compile_model(model, "CPU", config)
    name = args.onnx.rsplit("/", 1)[-1].removesuffix(".onnx")
    rng = np.random.default_rng(0)
    for batch in batches:
        if args.shape == "static":
            fixed = core.read_model(args.onnx)
            fixed.reshape({0: [batch, 3, height, width]})
            compiled = core.compile_model(fixed, "CPU", config)
        request = compiled.create_infer_request()
        x = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
        for _ in range(3):
            request.infer({0: x})
        runs, busy, start = 0, 0.0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            t0 = time.perf_counter()
            request.infer({0: x})
            busy += time.perf_counter() - t0
            runs += 1
        per_batch = busy / runs
        print(f"| {name} | openvino-python{'' if args.shape == 'dynamic' else ' ' + args.shape} | {height}x{width} | "
              f"{args.threads} | {batch} | {batch / per_batch:.1f} | {per_batch * 1e3:.2f} |"
              + ("" if args.precision == "f32" else f" {args.precision}"), flush=True)


if __name__ == "__main__":
    main()
