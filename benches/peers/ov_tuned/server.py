"""ov_tuned: the strongest ~100-line Python + OpenVINO classifier, a stand-in for OpenVINO Model Server.

The peer kit's fastapi_ov_2w is deliberately plain (2 uvicorn workers, each runs one request at a time,
LATENCY hint). This is what a user who tunes OpenVINO by the book writes instead, in ONE process:
  * the kit's model and preprocessing: the timm model from PEER_MODEL_DIR exported to ONNX once at
    start-up exactly as the kit's fastapi/server.py does, timm's eval transform on a Pillow decode;
  * OpenVINO compiled with PERFORMANCE_HINT=THROUGHPUT (it picks the streams and threads for this CPU),
    the input reshaped to a static batch of 1 (fixed-shape kernels), denormals flushed;
    PEER_PRECISION=f32 (default: INFERENCE_PRECISION_HINT=f32) or default (OpenVINO's choice: bf16 on
    CPUs with AMX / AVX512-BF16);
  * an openvino.AsyncInferQueue sized to OPTIMAL_NUMBER_OF_INFER_REQUESTS keeps every stream busy;
  * decode + preprocess, and the hand-off to the queue (which waits for a free request), run in a
    ThreadPoolExecutor of CPU-count threads, so the event loop only parses HTTP and never blocks;
    Pillow and torch release the GIL there, and torch runs 1 thread per call (the pool is the parallelism).
    The hand-off takes a lock: start_async picks an idle request and then fills it, which two threads can
    race on ("Infer Request is busy", and a lost request);
  * each request awaits an asyncio future that the queue's callback completes via call_soon_threadsafe;
  * Starlette directly (FastAPI's validation layer adds nothing here), under uvicorn with uvloop + httptools.

POST /predict  raw image bytes -> [{"index", "label", "score"}] x5 (as the kit's peer), 400 if undecodable
GET  /health   -> {"status": "ok", ...}
Environment: PEER_MODEL_DIR (timm Hub-style folder), PEER_LABELS (imagenet_labels.json), PEER_ONNX_DIR
(where the export is cached), PEER_PRECISION=f32|default. Start: ov_tuned/start.sh (run from the kit).
"""
import asyncio
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openvino as ov
import timm
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from timm.data import create_transform, resolve_data_config

MODEL_DIR = os.path.abspath(os.environ['PEER_MODEL_DIR'])
PRECISION = os.environ.get('PEER_PRECISION', 'f32')
assert PRECISION in ('f32', 'default'), f'PEER_PRECISION must be f32 or default, not {PRECISION}'
with open(os.environ['PEER_LABELS']) as f:
    LABELS = json.load(f)

torch.set_num_threads(1)
torch.set_flush_denormal(True)  # as the kit's peer (this thread; pool threads set it too, see below)
model = timm.create_model('local-dir:' + MODEL_DIR, pretrained=True).eval()
data_cfg = resolve_data_config({}, model=model)
transform = create_transform(**data_cfg)  # Resize(shorter=size/crop_pct, bicubic) -> CenterCrop -> ToTensor -> Normalize
onnx_path = os.path.join(os.environ['PEER_ONNX_DIR'], 'ov_tuned-' + os.path.basename(MODEL_DIR) + '.onnx')
if not os.path.exists(onnx_path):  # the kit's export: the same call, the same arguments
    tmp = onnx_path + f'.{os.getpid()}.tmp'
    torch.onnx.export(model, torch.zeros(1, *data_cfg['input_size']), tmp, input_names=['x'],
                      output_names=['y'], dynamic_axes={'x': {0: 'b'}}, opset_version=17, dynamo=False)
    os.replace(tmp, onnx_path)
del model

core = ov.Core()
graph = core.read_model(onnx_path)
graph.reshape([1, *data_cfg['input_size']])
props = {'PERFORMANCE_HINT': 'THROUGHPUT', 'CPU_DENORMALS_OPTIMIZATION': 'YES'}
if PRECISION == 'f32':
    props['INFERENCE_PRECISION_HINT'] = 'f32'
compiled = core.compile_model(graph, 'CPU', props)
N_REQUESTS = compiled.get_property('OPTIMAL_NUMBER_OF_INFER_REQUESTS')
queue = ov.AsyncInferQueue(compiled, N_REQUESTS)


def resolve(fut, out):
    if not fut.done():  # the client may have gone away
        fut.set_result(out)


def on_done(request, fut):  # an OpenVINO thread: copy the logits (the request is reused) and hand back
    if fut is not None:  # None: warm-up
        fut.get_loop().call_soon_threadsafe(resolve, fut, request.get_output_tensor(0).data[0].copy())


queue.set_callback(on_done)
SUBMIT = threading.Lock()
PREP_THREADS = os.cpu_count()
POOL = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix='prep', initializer=torch.set_flush_denormal,
                          initargs=(True,))


class BadImage(Exception):
    pass


def prepare_and_submit(body, fut):  # a pool thread: decode, preprocess, queue (waits for a free request)
    try:
        img = Image.open(io.BytesIO(body)).convert('RGB')
    except Exception as e:  # PIL raises several types for garbage input
        raise BadImage(f'cannot decode image: {e}') from None
    with torch.inference_mode():
        x = transform(img).unsqueeze(0).numpy()
    with SUBMIT:  # start_async picks an idle request, then fills it: not atomic across threads
        queue.start_async({0: x}, fut)


def top5(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    idx = np.argpartition(p, -5)[-5:]
    return [{'index': int(i), 'label': LABELS[i], 'score': float(p[i])} for i in idx[np.argsort(-p[idx])]]


async def predict(request):
    body = await request.body()
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    try:
        await loop.run_in_executor(POOL, prepare_and_submit, body, fut)
    except BadImage as e:
        return JSONResponse({'detail': str(e)}, status_code=400)
    return JSONResponse(top5(await fut))


async def health(request):
    return JSONResponse({'status': 'ok', 'model': os.path.basename(MODEL_DIR), 'precision': PRECISION,
                         'infer_requests': N_REQUESTS, 'streams': compiled.get_property('NUM_STREAMS'),
                         'prep_threads': PREP_THREADS})


with torch.inference_mode():  # warm-up: every infer request once, so the first clients pay no lazy init
    for _ in range(N_REQUESTS):
        queue.start_async({0: transform(Image.new('RGB', (500, 333))).unsqueeze(0).numpy()}, None)
    queue.wait_all()
app = Starlette(routes=[Route('/predict', predict, methods=['POST']), Route('/health', health)])
