"""KServe v2 REST, spoken by NVIDIA's tritonclient.http (plus raw `requests` where the client
cannot say it)."""
import json

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from v2helpers import (MODEL, NUM_CLASSES, NUM_FEATURES, PHOTOS, SAME_TOL, SIZE, VERSION,
                       assert_classification_matches, assert_probabilities_match_reference,
                       assert_probabilities_match_v1, assert_stats_grew, images_tensor, model_stats,
                       normalised, parse_v2_response, photo_bytes, pixels_batch)


@pytest.fixture(scope="module")
def client(http_addr):
    c = httpclient.InferenceServerClient(url=http_addr, connection_timeout=10.0, network_timeout=60.0)
    yield c
    c.close()


def image_input(photos, binary=True):
    inp = httpclient.InferInput("image", [len(photos)], "BYTES")
    inp.set_data_from_numpy(images_tensor(photos), binary_data=binary)
    return inp


def pixels_input(array, binary=True):
    datatype = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[array.dtype]
    inp = httpclient.InferInput("pixels", list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def probabilities(client, inputs, binary_output=True):
    result = client.infer(MODEL, inputs,
                          outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary_output)])
    return result.as_numpy("probabilities")


def assert_answers_good_request(client):
    photos = PHOTOS[:1]
    assert_probabilities_match_reference(probabilities(client, [image_input(photos)]), photos)


def test_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, VERSION)
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready(MODEL, "7")


def test_server_metadata(client):
    meta = client.get_server_metadata()
    assert meta["name"] == "visionserve", meta
    assert isinstance(meta["version"], str) and meta["version"], meta
    assert {"classification", "binary_tensor_data", "statistics"} <= set(meta["extensions"]), meta


@pytest.mark.parametrize("version", ["", VERSION])
def test_model_metadata(client, version):
    meta = client.get_model_metadata(MODEL, version)
    assert meta["name"] == MODEL, meta
    assert meta["versions"] == [VERSION], meta
    assert isinstance(meta["platform"], str) and meta["platform"], meta
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 3, SIZE, SIZE])}, meta
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, NUM_CLASSES]), "logits": ("FP32", [-1, NUM_CLASSES]),
                       "embeddings": ("FP32", [-1, NUM_FEATURES])}, meta


def test_infer_all_outputs_by_default(client, v1_results):
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    result = client.infer(MODEL, [image_input(PHOTOS)])
    names = sorted(o["name"] for o in result.get_response()["outputs"])
    assert names == ["embeddings", "logits", "probabilities"], result.get_response()
    probs = result.as_numpy("probabilities")
    logits = result.as_numpy("logits")
    embeddings = result.as_numpy("embeddings")
    assert logits.shape == (len(PHOTOS), NUM_CLASSES) and logits.dtype == np.float32
    assert embeddings.shape == (len(PHOTOS), NUM_FEATURES) and np.all(np.isfinite(embeddings))
    assert_probabilities_match_reference(probs, PHOTOS)
    assert_probabilities_match_v1(probs, PHOTOS, v1_results)
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, shifted / shifted.sum(axis=1, keepdims=True), atol=SAME_TOL)


@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-out", "json-out"])
def test_infer_images_probabilities(client, v1_results, binary_output):
    probs = probabilities(client, [image_input(PHOTOS)], binary_output)
    assert_probabilities_match_reference(probs, PHOTOS)
    assert_probabilities_match_v1(probs, PHOTOS, v1_results)


@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-out", "json-out"])
def test_classification_extension(client, v1_results, binary_output):
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_output, class_count=5)
    result = client.infer(MODEL, [image_input(PHOTOS)], outputs=[out])
    (meta,) = result.get_response()["outputs"]
    assert meta["datatype"] == "BYTES" and meta["shape"] == [len(PHOTOS), 5], meta
    assert_classification_matches(result.as_numpy("probabilities"), PHOTOS, v1_results)


@pytest.fixture(scope="module")
def image_probabilities(client):
    return probabilities(client, [image_input(PHOTOS)])


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
def test_uint8_pixels_match_image_path(client, image_probabilities, binary_input):
    probs = probabilities(client, [pixels_input(pixels_batch(PHOTOS), binary_input)])
    np.testing.assert_allclose(probs, image_probabilities, atol=SAME_TOL, rtol=0)
    assert_probabilities_match_reference(probs, PHOTOS)


def test_fp32_normalised_pixels_match_image_path(client, image_probabilities):
    probs = probabilities(client, [pixels_input(normalised(pixels_batch(PHOTOS)))])
    np.testing.assert_allclose(probs, image_probabilities, atol=SAME_TOL, rtol=0)


def test_only_requested_outputs_come_back(client):
    photos = PHOTOS[:2]
    result = client.infer(MODEL, [image_input(photos)], outputs=[httpclient.InferRequestedOutput("embeddings")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["embeddings"]
    assert result.as_numpy("probabilities") is None
    emb = result.as_numpy("embeddings")
    assert emb.shape == (len(photos), NUM_FEATURES) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb)) and np.any(emb != 0)
    assert not np.allclose(emb[0], emb[1]), "two different photos gave the same embedding"


def test_request_id_is_echoed(client):
    result = client.infer(MODEL, [image_input(PHOTOS[:1])], request_id="triton-http-42",
                          outputs=[httpclient.InferRequestedOutput("probabilities")])
    response = result.get_response()
    assert response["id"] == "triton-http-42", response
    assert response["model_name"] == MODEL, response


def test_statistics_count_inferences(client):
    stats = client.get_inference_statistics(MODEL)
    entry = model_stats(stats)
    assert entry["version"] == VERSION, entry
    for key in ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output"]:
        assert {"count", "ns"} <= set(entry["inference_stats"][key]), entry
    batches = [[PHOTOS[0], PHOTOS[1]], [PHOTOS[2]], PHOTOS]
    for photos in batches:
        probabilities(client, [image_input(photos)])
    after = model_stats(client.get_inference_statistics(MODEL, VERSION))
    assert_stats_grew(entry, after, requests_made=len(batches), images=sum(map(len, batches)))
    for b in after["batch_stats"]:
        assert b["batch_size"] >= 1 and {"compute_input", "compute_infer", "compute_output"} <= set(b), b


def test_raw_binary_request(http_addr):
    photo = PHOTOS[2]
    r = requests.post(f"http://{http_addr}/v2/models/{MODEL}/infer", data=photo_bytes(photo),
                      headers={"Inference-Header-Content-Length": "0",
                               "Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    _, arrays = parse_v2_response(r)
    assert_probabilities_match_reference(arrays["probabilities"], [photo])


# --- errors -----------------------------------------------------------------------------------

def _bad_datatype(_):
    inp = httpclient.InferInput("image", [1], "FP32")
    inp.set_data_from_numpy(np.zeros([1], np.float32))
    return dict(inputs=[inp]), ["BYTES"]


def _bad_pixels_shape(_):
    return dict(inputs=[pixels_input(np.zeros([1, 3, 100, 100], np.uint8))]), ["224"]


def _unknown_output(_):
    return (dict(inputs=[image_input(PHOTOS[:1])], outputs=[httpclient.InferRequestedOutput("no_such_output")]),
            ["no_such_output", "probabilities"])


def _unknown_input(_):
    inp = httpclient.InferInput("picture", [1], "BYTES")
    inp.set_data_from_numpy(images_tensor(PHOTOS[:1]))
    return dict(inputs=[inp]), ["picture", "image"]


def _both_inputs(_):
    return dict(inputs=[image_input(PHOTOS[:1]), pixels_input(pixels_batch(PHOTOS[:1]))]), ["image", "pixels"]


def _too_many_images(_):
    return dict(inputs=[image_input(["chelsea_tiny.png"] * 33)]), ["32"]


ERRORS = {"wrong-datatype": _bad_datatype, "pixels-shape": _bad_pixels_shape, "unknown-output": _unknown_output,
          "unknown-input": _unknown_input, "image-and-pixels": _both_inputs, "33-images": _too_many_images}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_request_is_400(client, case):
    kwargs, hints = ERRORS[case](client)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, **kwargs)
    err = info.value
    assert err.status() == "400", (err.status(), err.message())
    assert any(h.lower() in err.message().lower() for h in hints), f"{err.message()!r} names none of {hints}"
    assert_answers_good_request(client)


def test_unknown_model_is_404(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", [image_input(PHOTOS[:1])])
    assert info.value.status() == "404", (info.value.status(), info.value.message())
    assert "no_such_model" in info.value.message(), info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert info.value.status() == "404"
    assert_answers_good_request(client)


def _binary_request(raw: bytes, declared: int, trailing: bytes = b""):
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    return header + raw + trailing, len(header)


def _prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


@pytest.mark.parametrize("case", ["size-past-body", "bytes-left-over", "prefix-overruns"])
def test_binary_sizes_that_do_not_add_up_are_400(client, http_addr, case):
    image = photo_bytes(PHOTOS[0])
    raw = _prefixed(image)
    if case == "size-past-body":
        body, json_len = _binary_request(raw, len(raw) + 16)
    elif case == "bytes-left-over":
        body, json_len = _binary_request(raw, len(raw), trailing=b"\0" * 7)
    else:  # binary_data_size matches the body, but the element's length prefix claims more
        raw = (len(image) + 100).to_bytes(4, "little") + image
        body, json_len = _binary_request(raw, len(raw))
    r = requests.post(f"http://{http_addr}/v2/models/{MODEL}/infer", data=body, timeout=60,
                      headers={"Inference-Header-Content-Length": str(json_len),
                               "Content-Type": "application/octet-stream"})
    assert r.status_code == 400, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert isinstance(error, str) and error
    assert_answers_good_request(client)


def test_still_serving_after_errors(client, v1_results):
    # Runs last in this module: every error above left the server answering correctly.
    assert client.is_server_ready()
    probs = probabilities(client, [image_input(PHOTOS)])
    assert_probabilities_match_reference(probs, PHOTOS)
    assert_probabilities_match_v1(probs, PHOTOS, v1_results)
