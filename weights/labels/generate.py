"""Regenerate the label files the server embeds, from timm's ImageNet metadata.

One label per line, in class-index order: timm's `label_descriptions()` (the WordNet lemmas,
e.g. "tiger cat"), which is what timm and the Hub model cards print. Run with the project venv:
    python weights/labels/generate.py
"""
from pathlib import Path

from timm.data import ImageNetInfo

SUBSETS = {
    "imagenet-1k": 1000,
    "imagenet-12k": 11821,
    "imagenet-21k-goog": 21843,
}

here = Path(__file__).parent
for subset, num_classes in SUBSETS.items():
    info = ImageNetInfo(subset)
    labels = info.label_descriptions()
    assert len(labels) == num_classes, (subset, len(labels))
    assert all("\n" not in label for label in labels)
    (here / f"{subset}.txt").write_text("\n".join(labels) + "\n")
    print(subset, len(labels))
