"""KServe v2 gRPC (inference.GRPCInferenceService), spoken by NVIDIA's tritonclient.grpc.

tritonclient.grpc always sends tensors in raw_input_contents (BYTES as 4-byte little-endian
length + bytes per element) and reads raw_output_contents; the typed `contents` path is driven
here through tritonclient's own generated stubs."""
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from v2helpers import (MODEL, NUM_CLASSES, NUM_FEATURES, PHOTOS, SAME_TOL, SIZE, VERSION,
                       assert_classification_matches, assert_probabilities_match_reference,
                       assert_probabilities_match_v1, assert_stats_grew, images_tensor, model_stats,
                       normalised, parse_classification, photo_bytes, pixels_batch, reference)

INVALID_ARGUMENT = str(grpc.StatusCode.INVALID_ARGUMENT)
NOT_FOUND = str(grpc.StatusCode.NOT_FOUND)


@pytest.fixture(scope="module")
def client(grpc_addr):
    c = grpcclient.InferenceServerClient(url=grpc_addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(grpc_addr):
    with grpc.insecure_channel(grpc_addr) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def image_input(photos):
    inp = grpcclient.InferInput("image", [len(photos)], "BYTES")
    inp.set_data_from_numpy(images_tensor(photos))
    return inp


def pixels_input(array):
    datatype = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[array.dtype]
    inp = grpcclient.InferInput("pixels", list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def probabilities(client, inputs):
    result = client.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("probabilities")])
    return result.as_numpy("probabilities")


def assert_answers_good_request(client):
    assert_probabilities_match_reference(probabilities(client, [image_input(PHOTOS[:1])]), PHOTOS[:1])


def test_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, VERSION)
    try:
        assert not client.is_model_ready("no_such_model")
    except InferenceServerException as e:  # ready=false or NOT_FOUND are both fair answers
        assert e.status() == NOT_FOUND, (e.status(), e.message())


def test_server_metadata(client):
    meta = client.get_server_metadata()
    assert meta.name == "visionserve", meta
    assert meta.version, meta
    assert {"classification", "binary_tensor_data", "statistics"} <= set(meta.extensions), meta


@pytest.mark.parametrize("version", ["", VERSION])
def test_model_metadata(client, version):
    meta = client.get_model_metadata(MODEL, version)
    assert meta.name == MODEL and list(meta.versions) == [VERSION] and meta.platform, meta
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs == {"image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 3, SIZE, SIZE])}, meta
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert outputs == {"probabilities": ("FP32", [-1, NUM_CLASSES]), "logits": ("FP32", [-1, NUM_CLASSES]),
                       "embeddings": ("FP32", [-1, NUM_FEATURES])}, meta


@pytest.fixture(scope="module")
def all_outputs(client):
    result = client.infer(MODEL, [image_input(PHOTOS)])
    response = result.get_response()
    assert sorted(o.name for o in response.outputs) == ["embeddings", "logits", "probabilities"], response
    assert len(response.raw_output_contents) == len(response.outputs), "outputs not in raw_output_contents"
    return {name: result.as_numpy(name) for name in ["probabilities", "logits", "embeddings"]}


def test_infer_images_all_outputs(all_outputs, v1_results):
    probs, logits, emb = all_outputs["probabilities"], all_outputs["logits"], all_outputs["embeddings"]
    assert_probabilities_match_reference(probs, PHOTOS)
    assert_probabilities_match_v1(probs, PHOTOS, v1_results)
    assert logits.shape == (len(PHOTOS), NUM_CLASSES) and logits.dtype == np.float32
    assert emb.shape == (len(PHOTOS), NUM_FEATURES) and np.all(np.isfinite(emb))
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, shifted / shifted.sum(axis=1, keepdims=True), atol=SAME_TOL)


def test_classification_extension(client, all_outputs, v1_results):
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=5),
               grpcclient.InferRequestedOutput("logits", class_count=3)]
    result = client.infer(MODEL, [image_input(PHOTOS)], outputs=outputs)
    response = result.get_response()
    shapes = {o.name: (o.datatype, list(o.shape)) for o in response.outputs}
    assert shapes == {"probabilities": ("BYTES", [len(PHOTOS), 5]), "logits": ("BYTES", [len(PHOTOS), 3])}
    assert_classification_matches(result.as_numpy("probabilities"), PHOTOS, v1_results)
    # On logits the score is the logit itself.
    for row, logits, photo in zip(parse_classification(result.as_numpy("logits")), all_outputs["logits"], PHOTOS):
        assert [i for _, i, _ in row] == [int(i) for i, _ in reference()[photo][:3]], row
        for score, index, _ in row:
            assert abs(score - float(logits[index])) <= 1e-4, (row, logits[index])


def test_uint8_pixels_match_image_path(client, all_outputs):
    probs = probabilities(client, [pixels_input(pixels_batch(PHOTOS))])
    np.testing.assert_allclose(probs, all_outputs["probabilities"], atol=SAME_TOL, rtol=0)
    assert_probabilities_match_reference(probs, PHOTOS)


def test_fp32_normalised_pixels_match_image_path(client, all_outputs):
    probs = probabilities(client, [pixels_input(normalised(pixels_batch(PHOTOS)))])
    np.testing.assert_allclose(probs, all_outputs["probabilities"], atol=SAME_TOL, rtol=0)


def test_only_requested_outputs_and_id(client):
    photos = PHOTOS[:2]
    result = client.infer(MODEL, [image_input(photos)], model_version=VERSION, request_id="triton-grpc-7",
                          outputs=[grpcclient.InferRequestedOutput("embeddings")])
    response = result.get_response()
    assert response.id == "triton-grpc-7" and response.model_name == MODEL, response
    assert [o.name for o in response.outputs] == ["embeddings"]
    emb = result.as_numpy("embeddings")
    assert emb.shape == (len(photos), NUM_FEATURES) and np.all(np.isfinite(emb)) and np.any(emb != 0)


def _typed_request(datatype, shape, **contents):
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name="image" if datatype == "BYTES" else "pixels", datatype=datatype, shape=shape)
    for key, values in contents.items():
        getattr(tensor.contents, key).extend(values)
    request.outputs.add(name="probabilities")
    return request


def _probabilities_of(response):
    (out,) = response.outputs
    assert out.name == "probabilities" and out.datatype == "FP32", response
    (raw,) = response.raw_output_contents
    return np.frombuffer(raw, dtype="<f4").reshape(list(out.shape))


def test_typed_contents(stub, all_outputs):
    photos = PHOTOS[:2]
    expected = all_outputs["probabilities"][:2]
    request = _typed_request("BYTES", [len(photos)], bytes_contents=[photo_bytes(p) for p in photos])
    np.testing.assert_allclose(_probabilities_of(stub.ModelInfer(request, timeout=60)), expected, atol=SAME_TOL, rtol=0)
    pixels = pixels_batch(photos)
    request = _typed_request("UINT8", list(pixels.shape), uint_contents=pixels.ravel().tolist())
    np.testing.assert_allclose(_probabilities_of(stub.ModelInfer(request, timeout=60)), expected, atol=SAME_TOL, rtol=0)


def test_statistics_count_inferences(client):
    before = model_stats(client.get_inference_statistics(MODEL, as_json=True))
    assert before["version"] == VERSION, before
    batches = [[PHOTOS[0]], PHOTOS[1:4]]
    for photos in batches:
        probabilities(client, [image_input(photos)])
    after = model_stats(client.get_inference_statistics(MODEL, VERSION, as_json=True))
    assert_stats_grew(before, after, requests_made=len(batches), images=sum(map(len, batches)))


def test_health_check(grpc_addr):
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        pytest.skip("grpcio-health-checking is not installed")
    with grpc.insecure_channel(grpc_addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply


# --- errors -----------------------------------------------------------------------------------

def _bad_datatype():
    inp = grpcclient.InferInput("image", [1], "FP32")
    inp.set_data_from_numpy(np.zeros([1], np.float32))
    return dict(inputs=[inp]), ["BYTES"]


def _unknown_output():
    return (dict(inputs=[image_input(PHOTOS[:1])], outputs=[grpcclient.InferRequestedOutput("no_such_output")]),
            ["no_such_output", "probabilities"])


def _unknown_input():
    inp = grpcclient.InferInput("picture", [1], "BYTES")
    inp.set_data_from_numpy(images_tensor(PHOTOS[:1]))
    return dict(inputs=[inp]), ["picture", "image"]


ERRORS = {
    "wrong-datatype": _bad_datatype,
    "pixels-shape": lambda: (dict(inputs=[pixels_input(np.zeros([1, 3, 100, 100], np.uint8))]), ["224"]),
    "unknown-output": _unknown_output,
    "unknown-input": _unknown_input,
    "33-images": lambda: (dict(inputs=[image_input(["chelsea_tiny.png"] * 33)]), ["32"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_request_is_invalid_argument(client, case):
    kwargs, hints = ERRORS[case]()
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, **kwargs)
    err = info.value
    assert err.status() == INVALID_ARGUMENT, (err.status(), err.message())
    assert any(h.lower() in err.message().lower() for h in hints), f"{err.message()!r} names none of {hints}"
    assert_answers_good_request(client)


def test_malformed_raw_bytes_is_invalid_argument(client, stub):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    image = photo_bytes(PHOTOS[0])
    request.raw_input_contents.append((len(image) + 100).to_bytes(4, "little") + image)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert_answers_good_request(client)


def test_unknown_model_is_not_found(client):
    for call in [lambda: client.infer("no_such_model", [image_input(PHOTOS[:1])]),
                 lambda: client.get_model_metadata("no_such_model")]:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == NOT_FOUND, (info.value.status(), info.value.message())
    assert "no_such_model" in info.value.message()
    assert_answers_good_request(client)


def test_still_serving_after_errors(client, v1_results):
    assert client.is_server_ready()
    probs = probabilities(client, [image_input(PHOTOS)])
    assert_probabilities_match_reference(probs, PHOTOS)
    assert_probabilities_match_v1(probs, PHOTOS, v1_results)
