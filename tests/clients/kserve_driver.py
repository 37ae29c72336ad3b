"""Runs visionserve's v2 endpoints through the kserve SDK (0.21) and writes what came back as JSON.

    python kserve_driver.py HTTP_ADDR GRPC_ADDR OUT.json

A separate process because kserve and tritonclient.grpc both register the protobuf messages
"inference.*" (grpc_predict_v2.proto vs grpc_service.proto) in the default descriptor pool, and
the second import fails with "duplicate symbol". test_kserve.py runs this and checks the results.
Each case is recorded independently: {"ok": true, ...outputs} or {"ok": false, "error": "..."}.
"""
import asyncio
import json
import sys
import traceback

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

from v2helpers import MODEL, PHOTOS, images_tensor, photo_bytes, pixels_batch

TIMEOUT_S = 60


def describe(response):
    outputs = {}
    for out in response.outputs:
        arr = out.as_numpy()
        if arr.dtype == np.object_:
            data = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr.ravel()]
        else:
            data = arr.astype(np.float64).ravel().tolist()
        outputs[out.name] = {"datatype": out.datatype, "shape": [int(d) for d in out.shape],
                             "numpy_shape": list(arr.shape), "numpy_dtype": str(arr.dtype), "data": data}
    return {"ok": True, "id": response.id, "model_name": response.model_name, "outputs": outputs}


def image_input(photos, raw=True):
    if raw:  # REST: binary tensor after the JSON; gRPC: raw_input_contents, length-prefixed
        inp = InferInput("image", [len(photos)], "BYTES")
        inp.set_data_from_numpy(images_tensor(photos), binary_data=True)
        return inp
    # gRPC only: typed contents (bytes_contents), one element per image
    return InferInput("image", [len(photos)], "BYTES", data=[photo_bytes(p) for p in photos])


def pixels_input(photos, raw=True):
    pixels = pixels_batch(photos)
    if raw:
        inp = InferInput("pixels", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels, binary_data=True)
        return inp
    return InferInput("pixels", list(pixels.shape), "UINT8", data=pixels.ravel().tolist())


def probabilities_only():
    return [RequestedOutput("probabilities")]


def classification(k):
    return [RequestedOutput("probabilities", parameters={"classification": k})]


async def rest_cases(base_url):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT_S))
    try:
        async def health():
            return {"ok": True, "live": await client.is_server_live(base_url),
                    "ready": await client.is_server_ready(base_url),
                    "model_ready": await client.is_model_ready(base_url, MODEL)}

        async def infer(request):
            return describe(await client.infer(base_url, request, model_name=MODEL))

        return {
            "rest_health": health,
            "rest_bytes": lambda: infer(InferRequest(MODEL, [image_input(PHOTOS)], request_id="kserve-rest-bytes",
                                                     request_outputs=probabilities_only())),
            "rest_bytes_binary_outputs": lambda: infer(InferRequest(MODEL, [image_input(PHOTOS)],
                                                                    request_id="kserve-rest-binary",
                                                                    parameters={"binary_data_output": True})),
            "rest_pixels": lambda: infer(InferRequest(MODEL, [pixels_input(PHOTOS)], request_id="kserve-rest-pixels",
                                                      request_outputs=probabilities_only())),
            "rest_classification": lambda: infer(InferRequest(MODEL, [image_input(PHOTOS)], request_id="kserve-rest-cls",
                                                              request_outputs=classification(5))),
        }, client.close
    except Exception:
        await client.close()
        raise


async def grpc_cases(address):
    client = InferenceGRPCClient(address, timeout=TIMEOUT_S, retries=0)

    async def health():
        return {"ok": True, "live": await client.is_server_live(), "ready": await client.is_server_ready(),
                "model_ready": await client.is_model_ready(MODEL)}

    async def infer(request):
        return describe(await client.infer(request))

    return {
        "grpc_health": health,
        "grpc_bytes_raw": lambda: infer(InferRequest(MODEL, [image_input(PHOTOS)], request_id="kserve-grpc-raw",
                                                     request_outputs=probabilities_only())),
        "grpc_bytes_typed": lambda: infer(InferRequest(MODEL, [image_input(PHOTOS, raw=False)],
                                                       request_id="kserve-grpc-typed",
                                                       request_outputs=probabilities_only())),
        "grpc_pixels_raw": lambda: infer(InferRequest(MODEL, [pixels_input(PHOTOS)], request_id="kserve-grpc-pixels",
                                                      request_outputs=probabilities_only())),
        "grpc_pixels_typed": lambda: infer(InferRequest(MODEL, [pixels_input(PHOTOS, raw=False)],
                                                        request_id="kserve-grpc-pixels-typed",
                                                        request_outputs=probabilities_only())),
        "grpc_classification": lambda: infer(InferRequest(MODEL, [image_input(PHOTOS)], request_id="kserve-grpc-cls",
                                                          request_outputs=classification(5))),
    }, client.close


async def main(http_addr, grpc_addr):
    results = {}
    for make, target in [(rest_cases, f"http://{http_addr}"), (grpc_cases, grpc_addr)]:
        cases, close = await make(target)
        try:
            for name, case in cases.items():
                try:
                    results[name] = await case()
                except Exception as e:  # recorded; test_kserve.py fails that case with it
                    results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()}
        finally:
            await close()
    return results


if __name__ == "__main__":
    http_addr, grpc_addr, out = sys.argv[1:4]
    results = asyncio.run(main(http_addr, grpc_addr))
    with open(out, "w") as f:
        json.dump({"photos": PHOTOS, "cases": results}, f)
