"""KServe v2 through the kserve SDK's InferenceRESTClient and InferenceGRPCClient (async).

kserve cannot be imported next to tritonclient.grpc (both define the protobuf package
"inference"), so kserve_driver.py runs every call in a child process and this module checks
what it recorded."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from v2helpers import (MODEL, NUM_CLASSES, NUM_FEATURES, PHOTOS, SAME_TOL, assert_classification_matches,
                       assert_probabilities_match_reference, assert_probabilities_match_v1)

DRIVER = Path(__file__).with_name("kserve_driver.py")

# case -> (request id it sent, what it sent)
INFER_CASES = {
    "rest_bytes": "kserve-rest-bytes",
    "rest_bytes_binary_outputs": "kserve-rest-binary",
    "rest_pixels": "kserve-rest-pixels",
    "grpc_bytes_raw": "kserve-grpc-raw",
    "grpc_bytes_typed": "kserve-grpc-typed",
    "grpc_pixels_raw": "kserve-grpc-pixels",
    "grpc_pixels_typed": "kserve-grpc-pixels-typed",
}
CLASSIFICATION_CASES = {"rest_classification": "kserve-rest-cls", "grpc_classification": "kserve-grpc-cls"}


@pytest.fixture(scope="module")
def recorded(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("kserve") / "results.json"
    proc = subprocess.run([sys.executable, str(DRIVER), server.http, server.grpc, str(out)],
                          cwd=DRIVER.parent, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"kserve_driver.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert data["photos"] == PHOTOS
    return data["cases"]


def case(recorded, name):
    result = recorded[name]
    assert result["ok"], f"{name}: {result['error']}\n{result.get('traceback', '')}"
    return result


def tensor(output):
    dtype = np.object_ if output["datatype"] == "BYTES" else np.float32
    return np.array(output["data"], dtype=dtype).reshape(output["shape"])


@pytest.mark.parametrize("name", ["rest_health", "grpc_health"])
def test_health(recorded, name):
    result = case(recorded, name)
    assert (result["live"], result["ready"], result["model_ready"]) == (True, True, True), result


@pytest.mark.parametrize("name", list(INFER_CASES))
def test_inference_matches_reference(recorded, v1_results, name):
    result = case(recorded, name)
    assert result["id"] == INFER_CASES[name], result["id"]
    assert result["model_name"] == MODEL, result["model_name"]
    outputs = result["outputs"]
    if name == "rest_bytes_binary_outputs":
        assert sorted(outputs) == ["embeddings", "logits", "probabilities"], sorted(outputs)
        emb = tensor(outputs["embeddings"])
        assert emb.shape == (len(PHOTOS), NUM_FEATURES) and np.all(np.isfinite(emb))
        assert tensor(outputs["logits"]).shape == (len(PHOTOS), NUM_CLASSES)
    else:
        assert sorted(outputs) == ["probabilities"], sorted(outputs)
    probs = outputs["probabilities"]
    assert probs["datatype"] == "FP32" and probs["numpy_dtype"] == "float32", probs["datatype"]
    assert probs["shape"] == [len(PHOTOS), NUM_CLASSES]
    assert_probabilities_match_reference(tensor(probs), PHOTOS)
    assert_probabilities_match_v1(tensor(probs), PHOTOS, v1_results)


def test_all_paths_agree(recorded):
    base = tensor(case(recorded, "rest_bytes")["outputs"]["probabilities"])
    for name in INFER_CASES:
        other = tensor(case(recorded, name)["outputs"]["probabilities"])
        np.testing.assert_allclose(other, base, atol=SAME_TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", list(CLASSIFICATION_CASES))
def test_classification_extension(recorded, v1_results, name):
    result = case(recorded, name)
    assert result["id"] == CLASSIFICATION_CASES[name]
    out = result["outputs"]["probabilities"]
    assert out["datatype"] == "BYTES" and out["shape"] == [len(PHOTOS), 5], out
    assert_classification_matches(tensor(out), PHOTOS, v1_results)
