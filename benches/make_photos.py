#!/usr/bin/env python3
"""Large photos for --jpeg-draft's benchmarks and agreement study (`make bench-photos`,
`make photo-agreement`), written to OUT (default target/bench-photos):

  photo_12mp.jpg, photo_24mp.jpg   skimage's chelsea at 4032x3024 and 6000x4000 with a faint
                                   sensor-like grain, JPEG q90: 2.2 MB at 12 MP, as a phone
                                   photo (a plain upscale compresses to 0.9 MB, which would make
                                   entropy decoding, the part draft decoding cannot skip, look
                                   cheaper than it is)
  photo_12mp.png, photo_12mp.webp  the same 12 MP pixels, lossless PNG and lossy WebP (q90)
  agreement/*_{12,24}mp.jpg        scikit-image's photographs and the first 16 test-set photos
                                   (target/test-data/batch) upscaled to 12 and 24 MP, q90
  tf_efficientnetv2_s/             timm's tf_efficientnetv2_s.in21k_ft_in1k in the Hub layout with
                                   random weights (no released weights are reachable offline),
                                   BatchNorm statistics measured on real photos, and its classifier
                                   scaled so that its median top-1 probability on those photos is
                                   the real Lite0's (a random head spreads ~0.001 over every class,
                                   where any score difference would look negligible)

    python benches/make_photos.py [--out target/bench-photos] [--test-data target/test-data]
                                  [--lite0 weights/tf_efficientnet_lite0]
"""
import argparse
import math
from pathlib import Path

import numpy as np
import skimage
from PIL import Image

SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "retina.jpg", "rocket.jpg", "brick.png", "grass.png", "gravel.png",
                  "camera.png", "coins.png", "moon.png"]
TEST_SET_PHOTOS = 16


def upscale(image, megapixels):
    """Keep the aspect ratio, reach `megapixels` (Lanczos, as a camera's own scaler would)."""
    factor = math.sqrt(megapixels * 1e6 / (image.width * image.height))
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


def with_grain(image, sigma, seed):
    """Add luminance grain (sigma) and a little chroma grain (sigma / 2), as sensor noise."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image).astype(np.float32)
    pixels += rng.normal(0, sigma, pixels.shape[:2])[..., None] + rng.normal(0, sigma / 2, pixels.shape)
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))


def write_bench_photos(out):
    chelsea = Image.open(Path(skimage.data_dir) / "chelsea.png").convert("RGB")
    for megapixels, size in [(12, (4032, 3024)), (24, (6000, 4000))]:
        photo = with_grain(chelsea.resize(size, Image.Resampling.LANCZOS), 3, seed=megapixels)
        photo.save(out / f"photo_{megapixels}mp.jpg", quality=90)
        if megapixels == 12:
            photo.save(out / "photo_12mp.png")
            photo.save(out / "photo_12mp.webp", quality=90)


def write_agreement_photos(out, test_data):
    folder = out / "agreement"
    folder.mkdir(exist_ok=True)
    sources = [(Path(name).stem, Path(skimage.data_dir) / name) for name in SKIMAGE_PHOTOS]
    sources += [(f"batch{i:02d}", test_data / "batch" / f"{i:02d}.jpg") for i in range(TEST_SET_PHOTOS)]
    for stem, path in sources:
        image = Image.open(path).convert("RGB")
        for megapixels in (12, 24):
            upscale(image, megapixels).save(folder / f"{stem}_{megapixels}mp.jpg", quality=90)
    return len(sources)


def median_top1(logits, scale=1.0):
    return (logits * scale).softmax(-1).max(-1).values.median().item()


def lite0_confidence(lite0, photos):
    """The real Lite0's median top-1 probability on `photos`: how sure a trained model is."""
    import json

    import safetensors.torch
    import timm
    import torch
    from timm.data import create_transform

    config = json.loads((lite0 / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"])
    model.load_state_dict(safetensors.torch.load_file(str(lite0 / "model.safetensors")))
    model.eval()
    cfg = config["pretrained_cfg"]
    transform = create_transform(input_size=cfg["input_size"], interpolation=cfg["interpolation"],
                                 crop_pct=cfg["crop_pct"], mean=cfg["mean"], std=cfg["std"], is_training=False)
    with torch.no_grad():
        return median_top1(model(torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])))


def write_v2s(out, test_data, lite0):
    """tf_efficientnetv2_s with timm's random init, BatchNorm statistics from real photos at its
    384 px test size (random statistics make deep EfficientNets chaotic), and a classifier as
    confident as a trained one."""
    import timm
    import torch
    from timm.data import create_transform

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnetv2_s.in21k_ft_in1k", pretrained=False)
    cfg = model.pretrained_cfg
    transform = create_transform(input_size=cfg["test_input_size"], interpolation=cfg["interpolation"],
                                 crop_pct=cfg.get("test_crop_pct") or cfg["crop_pct"], crop_mode="center",
                                 mean=cfg["mean"], std=cfg["std"], is_training=False)
    photos = [Path(skimage.data_dir) / n for n in SKIMAGE_PHOTOS] + sorted((test_data / "batch").glob("*.jpg"))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in batch.split(8):
            model(chunk)
    model.eval()
    for m in norms:
        m.momentum = 0.1
    target = lite0_confidence(lite0, photos)
    with torch.no_grad():
        logits = model(batch)
        low, high = 1.0, 1e4
        for _ in range(60):  # bisect the logit scale on a log axis
            mid = math.sqrt(low * high)
            low, high = (mid, high) if median_top1(logits, mid) < target else (low, mid)
        model.get_classifier().weight.mul_(low)
        model.get_classifier().bias.mul_(low)
        f32 = model(batch[:8]).softmax(-1)
        f64 = model.double()(batch[:8].double()).softmax(-1)
        model.float()
    drift = (f32.double() - f64).abs().max().item()
    print(f"tf_efficientnetv2_s: classifier scaled {low:.1f}x to Lite0's median top-1 probability {target:.2f}; "
          f"f32 against f64 on 8 photos: largest probability difference {drift:.2e}, top-1 "
          f"{'identical' if (f32.argmax(-1) == f64.argmax(-1)).all() else 'DIFFERENT'}")
    timm.models.save_for_hf(model, str(out / "tf_efficientnetv2_s"), safe_serialization=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("target/bench-photos"))
    parser.add_argument("--test-data", type=Path, default=Path("target/test-data"))
    parser.add_argument("--lite0", type=Path, default=Path("weights/tf_efficientnet_lite0"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_bench_photos(args.out)
    n = write_agreement_photos(args.out, args.test_data)
    write_v2s(args.out, args.test_data, args.lite0)
    print(f"photos in {args.out}: photo_12mp/24mp (+ PNG and WebP at 12 MP), {n} photos at 12 and 24 MP, "
          "a tf_efficientnetv2_s checkpoint")


if __name__ == "__main__":
    main()
