"""`visionserve export` writes ONNX that other runtimes accept: for every parity fixture (one
per native preset, timm's or torchvision's checkpoint with random weights), the exported graph
passes ONNX's own checker with full checks (shape inference included), and ONNX Runtime's
outputs for it match the reference framework's to 1e-4 (max |diff| / max |logit|), with the
same top-5.

    VISIONSERVE_BIN          the release binary
    VISIONSERVE_PARITY_DATA  make parity-data's fixtures (unit folders with meta.json)
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def parity_units():
    root = os.environ.get("VISIONSERVE_PARITY_DATA")
    if not root:
        return []
    return sorted(p.parent for p in Path(root).glob("*/*/meta.json"))


def export(unit: Path, size: int, out: Path) -> Path:
    meta = json.loads((unit / "meta.json").read_text())
    source = str(unit / meta["weights"]) if meta.get("weights") else str(unit)
    options = [f"input_size={size}"]
    if meta.get("weights"):
        options.append(f"arch={meta['architecture']}")
    binary = os.environ.get("VISIONSERVE_BIN", str(REPO / "target" / "release" / "visionserve"))
    path = out / f"{unit.name}-{size}.onnx"
    done = subprocess.run([binary, "export", f"{source}?{'&'.join(options)}", "-o", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return path


@pytest.mark.skipif(not parity_units(), reason="VISIONSERVE_PARITY_DATA is not set (make test-clients sets it)")
@pytest.mark.parametrize("unit", parity_units(), ids=lambda u: f"{u.parent.name}/{u.name}")
def test_exported_graph_is_valid_and_matches_the_reference(unit, tmp_path):
    meta = json.loads((unit / "meta.json").read_text())
    references = load_file(str(unit / "reference.safetensors"))
    # The first (even) size: a graph is exported for one input size.
    size = meta["sizes"][0]
    path = export(unit, size, tmp_path)

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    props = {p.key: p.value for p in model.metadata_props}
    assert props["architecture"] == meta["architecture"]
    assert json.loads(props["input_size"]) == [3, size, size]
    assert len(json.loads(props["labels"])) == meta["num_classes"]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = references[f"input_{size}"]
    logits, embeddings = session.run(["logits", "embeddings"], {"input": x})
    want = references[f"logits_{size}"]
    rel = np.abs(logits - want).max() / np.abs(want).max()
    assert rel <= TOLERANCE, f"logits: max|diff|/max|logit| = {rel:.2e}"
    same_top5 = (np.argsort(-logits, 1)[:, :5] == np.argsort(-want, 1)[:, :5]).all()
    assert same_top5, "top-5 differs"
    if f"pre_logits_{size}" in references:
        want = references[f"pre_logits_{size}"]
        rel = np.abs(embeddings - want).max() / np.abs(want).max()
        assert rel <= TOLERANCE, f"embeddings: {rel:.2e}"


def test_external_data_holds_the_same_graph(tmp_path):
    """`--external-data` (what a graph over 2 GiB gets without asking: coatnet_5_224) keeps the
    weights beside the graph, page-aligned; runtimes read it as the same model."""
    model = Path(os.environ.get("VISIONSERVE_TEST_MODEL", REPO / "weights" / "tf_efficientnet_lite0"))
    binary = os.environ.get("VISIONSERVE_BIN", str(REPO / "target" / "release" / "visionserve"))
    paths = {}
    for name, extra in [("inline", []), ("external", ["--external-data"])]:
        paths[name] = tmp_path / name / "lite0.onnx"
        paths[name].parent.mkdir()
        done = subprocess.run([binary, "export", str(model), "-o", str(paths[name])] + extra,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    data = paths["external"].with_name("lite0.onnx.data")
    assert data.stat().st_size > 10 << 20 and paths["external"].stat().st_size < 1 << 20
    onnx.checker.check_model(str(paths["external"]), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    outputs = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
               for name, path in paths.items()}
    assert np.array_equal(outputs["inline"], outputs["external"])


def test_torchscript_exports_are_refused_with_the_reason(tmp_path):
    """Only native architectures have a description to record; a TorchScript file is opaque."""
    model = Path(os.environ.get("VISIONSERVE_TEST_MODEL", REPO / "weights" / "tf_efficientnet_lite0"))
    binary = os.environ.get("VISIONSERVE_BIN", str(REPO / "target" / "release" / "visionserve"))
    done = subprocess.run([binary, "export", str(model / "model.pt"), "-o", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "TorchScript" in done.stderr and "native" in done.stderr, done.stderr
    assert not (tmp_path / "x.onnx").exists()
