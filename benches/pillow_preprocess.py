"""The reference preprocessing cost: Pillow decode + timm's eval resize/crop, per photo, single
thread, median of 31 runs, whole and with Pillow's own `Image.draft("RGB", scale size)` (what
visionserve's --jpeg-draft reproduces). Compare with `cargo bench --bench preprocess` (same
photos, same columns); `benches/preprocess_vs_pillow.py` interleaves the two.

    python benches/pillow_preprocess.py [--data target/test-data] [--image PHOTO ...] [--model FOLDER]
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

from PIL import Image
from timm.data import create_transform

TEST_PHOTOS = ["chelsea.jpg", "rocket.jpg", "astronaut.png", "hubble_deep_field.jpg", "retina.jpg"]


def preprocess_config(model):
    """The model's pretrained_cfg (input size, filter, crop), or Lite0's 224 px default."""
    if model is None:
        return dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center")
    cfg = json.loads((Path(model) / "config.json").read_text())["pretrained_cfg"]
    size = cfg.get("test_input_size") or cfg["input_size"]
    return dict(input_size=tuple(size), interpolation=cfg.get("interpolation", "bicubic"),
                crop_pct=cfg.get("test_crop_pct") or cfg.get("crop_pct", 0.875),
                crop_mode=cfg.get("crop_mode") or "center")


def median_ms(samples):
    return statistics.median(samples) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("target/test-data"))
    parser.add_argument("--image", type=Path, action="append", default=[])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=31)
    args = parser.parse_args()
    cfg = preprocess_config(args.model)
    transform = create_transform(**cfg, is_training=False)
    steps = transform.transforms[:-2]  # up to the crop, as the Rust bench
    _, height, width = cfg["input_size"]
    draft_size = (math.floor(width / cfg["crop_pct"]), math.floor(height / cfg["crop_pct"]))
    photos = args.image or [args.data / "photos" / p for p in TEST_PHOTOS]
    print("| photo | size | decode ms | resize+crop ms | draft scale | draft decode ms | draft resize+crop ms |")
    print("|---|---|---|---|---|---|---|")
    for path in photos:
        row = {}
        for draft in (False, True):
            decode, resize = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                image = Image.open(path)
                if draft:
                    image.draft("RGB", draft_size)
                scale = image.decoderconfig[0] if draft and image.decoderconfig else 1
                image = image.convert("RGB")
                t1 = time.perf_counter()
                x = image
                for step in steps:
                    x = step(x)
                t2 = time.perf_counter()
                decode.append(t1 - t0)
                resize.append(t2 - t1)
            row[draft] = (image.size, scale, median_ms(decode), median_ms(resize))
        (w, h), _, decode_ms, resize_ms = row[False]
        _, scale, draft_decode_ms, draft_resize_ms = row[True]
        print(f"| {path.name} | {w}x{h} | {decode_ms:.2f} | {resize_ms:.2f} | 1/{scale} | "
              f"{draft_decode_ms:.2f} | {draft_resize_ms:.2f} |")


if __name__ == "__main__":
    main()
