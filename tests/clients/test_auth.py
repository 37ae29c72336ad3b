"""API keys as the client libraries send them: tritonclient's `headers=` over HTTP and gRPC
(gRPC metadata), refused without a key with the protocol's own error, answered with one."""
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import start_server, stop_server
from v2helpers import MODEL, images_tensor

KEY = "client-suite-key-0c7e"
PHOTO = "chelsea.png"


@pytest.fixture(scope="module")
def keyed_server():
    srv = start_server(["--api-key", KEY])
    yield srv
    stop_server(srv)


def infer_http(addr, headers):
    with httpclient.InferenceServerClient(url=addr) as client:
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(images_tensor([PHOTO]))
        return client.infer(MODEL, [inp], headers=headers)


def infer_grpc(addr, headers):
    client = grpcclient.InferenceServerClient(url=addr)
    try:
        inp = grpcclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(images_tensor([PHOTO]))
        return client.infer(MODEL, [inp], headers=headers)
    finally:
        client.close()


def test_http_client_needs_the_key(keyed_server):
    with pytest.raises(InferenceServerException) as refused:
        infer_http(keyed_server.http, headers=None)
    assert refused.value.status() == "401"
    assert "API key" in refused.value.message()
    result = infer_http(keyed_server.http, headers={"Authorization": f"Bearer {KEY}"})
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000)
    assert abs(float(np.sum(probabilities)) - 1.0) < 1e-3


def test_grpc_client_needs_the_key(keyed_server):
    with pytest.raises(InferenceServerException) as refused:
        infer_grpc(keyed_server.grpc, headers=None)
    assert refused.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    result = infer_grpc(keyed_server.grpc, headers={"x-api-key": KEY})
    assert result.as_numpy("probabilities").shape == (1, 1000)


def test_health_stays_open(keyed_server):
    with httpclient.InferenceServerClient(url=keyed_server.http) as client:
        assert client.is_server_ready()
    client = grpcclient.InferenceServerClient(url=keyed_server.grpc)
    try:
        assert client.is_server_live()
        assert client.is_model_ready(MODEL)
    finally:
        client.close()
