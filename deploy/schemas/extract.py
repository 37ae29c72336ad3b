#!/usr/bin/env python3
"""Keep one version's openAPIV3Schema of a published CustomResourceDefinition, as JSON.

    python3 deploy/schemas/extract.py CRD.yaml VERSION OUT.json

Only `description` texts are dropped (they are most of the bytes); every validation keyword
(types, properties, required, enums, patterns, x-kubernetes-* markers) is kept as published.
sources.yaml records where each kept schema came from; tests/ops/test_manifests.py reads it.
"""
import json
import sys

import yaml


def strip_descriptions(node):
    if isinstance(node, dict):
        # A string under "description" is the keyword; a property named "description" is a dict.
        return {k: strip_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(crd_path: str, version: str, out_path: str) -> None:
    with open(crd_path, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    assert crd["kind"] == "CustomResourceDefinition", crd_path
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip_descriptions(entry["schema"]["openAPIV3Schema"])
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
