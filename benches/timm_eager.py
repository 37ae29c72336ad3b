"""timm eager throughput, the reference the native and TorchScript numbers are compared with.

    python benches/timm_eager.py --model DIR [--batch-sizes 1,8] [--threads 2] [--seconds 5] [--dtype bf16]

DIR is a Hub-layout folder (config.json + model.safetensors). The measured work matches
`cargo bench --bench model`: a batch of preprocessed u8 images normalised, forward, softmax and
top-5, no_grad, denormals flushed. Run it with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
set as the server sets them (the Makefile does) so only the model implementation differs.
Prints markdown rows like the Rust bench. `--dtype bf16` casts the weights and the normalised input
to bfloat16, as `cargo bench --bench model -- --dtype bf16` does: what timm itself reaches at bf16.
"""
import argparse
import json
import time
from pathlib import Path

import safetensors.torch
import timm
import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.set_grad_enabled(False)

    config = json.loads((args.model / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    size = (cfg.get("test_input_size") if not cfg.get("fixed_input_size") else None) or cfg["input_size"]
    kwargs = {"img_size": size[-1]} if cfg.get("fixed_input_size") else {}
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"], **kwargs)
    model.load_state_dict(safetensors.torch.load_file(str(args.model / "model.safetensors")))
    model.eval()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(dtype)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    h, w = size[1], size[2]
    image = (torch.arange(h * w * 3) * 31 % 251).to(torch.uint8).view(h, w, 3)

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        pixels = image.unsqueeze(0).expand(batch, h, w, 3).contiguous()

        def run():
            x = pixels.permute(0, 3, 1, 2).contiguous().float().div(255).sub(mean).div(std).to(dtype)
            return model(x).softmax(-1).topk(5)

        for _ in range(3):
            run()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            run()
            runs += 1
        per_batch = (time.perf_counter() - start) / runs
        print(f"| {config['architecture']} | timm eager{' bf16' if args.dtype == 'bf16' else ''} | {h}x{w} | {torch.get_num_threads()} | {batch} "
              f"| {batch / per_batch:.1f} | {per_batch * 1e3:.2f} |")


if __name__ == "__main__":
    main()
