"""The reference preprocessing cost: Pillow decode + timm's eval resize/crop, per photo, single
thread, median of 31 runs. Compare with `cargo bench --bench preprocess` (same photos, same
224 px bicubic crop_pct 0.875 pipeline).

    python benches/pillow_preprocess.py [target/test-data]
"""
import statistics
import sys
import time
from pathlib import Path

from PIL import Image
from timm.data import create_transform

data = Path(sys.argv[1] if len(sys.argv) > 1 else "target/test-data")
transform = create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875,
                             crop_mode="center", is_training=False)
steps = transform.transforms[:-2]  # up to the crop, as the Rust bench
print("| photo | size | decode ms | resize+crop ms |")
print("|---|---|---|---|")
for photo in ["chelsea.jpg", "rocket.jpg", "astronaut.png", "hubble_deep_field.jpg", "retina.jpg"]:
    path = data / "photos" / photo
    decode, resize = [], []
    for _ in range(31):
        t0 = time.perf_counter()
        image = Image.open(path).convert("RGB")
        t1 = time.perf_counter()
        x = image
        for step in steps:
            x = step(x)
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        resize.append(t2 - t1)
    print(f"| {photo} | {image.width}x{image.height} | {statistics.median(decode) * 1e3:.2f} | {statistics.median(resize) * 1e3:.2f} |")
