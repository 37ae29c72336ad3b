"""Shared helpers for the KServe v2 client tests: test data, references, the native /v1 API
and a small parser for v2 REST responses (JSON plus Triton's binary tensor extension).

Nothing here imports tritonclient.grpc or kserve: the two register the same protobuf symbols
("inference.*") and cannot live in one process (see kserve_driver.py)."""
import json
import os
import re
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import requests

from server import MODEL, REPO, data_dir, model_dir  # noqa: F401  (re-exported for the tests)
VERSION = "1"
NUM_CLASSES = 1000
NUM_FEATURES = 1280
SIZE = 224
# A handful of photos keeps the suite fast on 2 cores (~10 ms an image); mixed PNG and JPEG.
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]

REF_TOL = 1e-4  # against timm on Pillow (lite0.json)
SAME_TOL = 1e-5  # between two paths through this server (v1 vs v2, image vs pixels)


@lru_cache(maxsize=None)
def reference() -> dict:
    """{photo: [[class_index, probability], ...]} -- timm's top-5 on Pillow."""
    return json.loads((data_dir() / "lite0.json").read_text())


@lru_cache(maxsize=None)
def photo_bytes(name: str) -> bytes:
    return (data_dir() / "photos" / name).read_bytes()


def images_tensor(photos) -> np.ndarray:
    """A BYTES tensor of shape [n]: one encoded image file per element."""
    return np.array([photo_bytes(p) for p in photos], dtype=np.object_)


@lru_cache(maxsize=None)
def _preprocess_index() -> dict:
    entries = json.loads((data_dir() / "preprocess.json").read_text())
    # Entries for the config named "lite0" are written as preprocess/lite0__<photo>.bin.
    return {e["photo"]: e for e in entries if Path(e["file"]).name.startswith(f"{MODEL}__")}


def pixels_chw(photo: str) -> np.ndarray:
    """timm's eval transform output before ToTensor, as u8 CHW [3, 224, 224]."""
    entry = _preprocess_index()[photo]
    assert list(entry["config"]["input_size"]) == [3, SIZE, SIZE], entry
    hwc = np.frombuffer((data_dir() / entry["file"]).read_bytes(), dtype=np.uint8)
    hwc = hwc.reshape(entry["height"], entry["width"], 3)
    assert hwc.shape == (SIZE, SIZE, 3), hwc.shape
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def pixels_batch(photos) -> np.ndarray:
    """UINT8 NCHW [n, 3, 224, 224]."""
    return np.stack([pixels_chw(p) for p in photos])


@lru_cache(maxsize=None)
def mean_std():
    cfg = json.loads((model_dir() / "config.json").read_text()).get("pretrained_cfg", {})
    mean = np.array(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=np.float32)
    std = np.array(cfg.get("std", (0.5, 0.5, 0.5)), dtype=np.float32)
    return mean, std


def normalised(pixels_u8: np.ndarray) -> np.ndarray:
    """What ToTensor + Normalize make of u8 NCHW pixels: FP32 NCHW."""
    mean, std = mean_std()
    x = pixels_u8.astype(np.float32) / np.float32(255.0)
    return ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)


def classify_v1(http_addr: str, photo: str, top_k: int = 5):
    """The native API: [(index, label, score)] best first."""
    r = requests.post(f"http://{http_addr}/v1/models/{MODEL}/classify", params={"top_k": top_k},
                      data=photo_bytes(photo), headers={"Content-Type": "application/octet-stream"},
                      timeout=60)
    assert r.status_code == 200, (r.status_code, r.text)
    body = r.json()
    assert body["model"] == MODEL, body
    (result,) = body["results"]
    return [(int(p["index"]), p.get("label"), float(p["score"])) for p in result["predictions"]]


def assert_probabilities_match_reference(probs: np.ndarray, photos, tol: float = REF_TOL):
    """probs [n, 1000] against lite0.json: same top-5 indices in order, values within tol."""
    probs = np.asarray(probs)
    assert probs.shape == (len(photos), NUM_CLASSES), probs.shape
    assert probs.dtype == np.float32, probs.dtype
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    for row, photo in zip(probs, photos):
        ref = reference()[photo]
        ref_idx = [int(i) for i, _ in ref]
        top = [int(i) for i in np.argsort(-row, kind="stable")[: len(ref)]]
        assert top == ref_idx, f"{photo}: top-5 {top} != reference {ref_idx}"
        for index, p in ref:
            assert abs(float(row[index]) - p) <= tol, f"{photo}: class {index} {row[index]} vs reference {p}"


def assert_probabilities_match_v1(probs: np.ndarray, photos, v1_results: dict, tol: float = SAME_TOL):
    for row, photo in zip(np.asarray(probs), photos):
        preds = v1_results[photo]
        top = [int(i) for i in np.argsort(-row, kind="stable")[: len(preds)]]
        assert top == [i for i, _, _ in preds], f"{photo}: v2 top {top} vs v1 {preds}"
        for index, _, score in preds:
            assert abs(float(row[index]) - score) <= tol, f"{photo}: class {index} v2 {row[index]} vs v1 {score}"


SCORE_RE = re.compile(r"-?\d+\.\d{6}")


def parse_classification(arr: np.ndarray):
    """Triton's classification strings "score:index:label" -> [[(score, index, label)]]."""
    out = []
    for row in np.asarray(arr, dtype=np.object_):
        parsed = []
        for item in row:
            text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            parts = text.split(":", 2)
            assert len(parts) == 3, f"not score:index:label: {text!r}"
            score, index, label = parts
            assert SCORE_RE.fullmatch(score), f"score not printed with 6 decimals: {text!r}"
            parsed.append((float(score), int(index), label))
        out.append(parsed)
    return out


def assert_classification_matches(arr: np.ndarray, photos, v1_results: dict, k: int = 5):
    arr = np.asarray(arr)
    assert arr.shape == (len(photos), k), arr.shape
    for row, photo in zip(parse_classification(arr), photos):
        ref = reference()[photo][:k]
        assert [i for _, i, _ in row] == [int(i) for i, _ in ref], f"{photo}: {row} vs reference {ref}"
        scores = [s for s, _, _ in row]
        assert scores == sorted(scores, reverse=True), row
        for (score, _, _), (_, p) in zip(row, ref):
            assert abs(score - p) <= REF_TOL, f"{photo}: {row} vs reference {ref}"
        labels = {i: label for i, label, _ in v1_results[photo]}
        for _, index, label in row:
            assert label, f"{photo}: empty label in {row}"
            if labels.get(index):
                assert label == labels[index], f"{photo}: label {label!r} vs /v1 {labels[index]!r}"


_NP_DTYPES = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "INT32": np.int32,
              "INT64": np.int64, "FP16": np.float16, "BOOL": np.bool_}


def _bytes_elements(raw: bytes):
    out, offset = [], 0
    while offset < len(raw):
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        out.append(raw[offset:offset + n])
        offset += n
    assert offset == len(raw), "BYTES tensor's length prefixes overrun its data"
    return out


def parse_v2_response(resp: requests.Response):
    """A v2 REST inference response -> (header dict, {output name: numpy array}), following
    Inference-Header-Content-Length and each output's binary_data_size."""
    body = resp.content
    header_len = resp.headers.get("Inference-Header-Content-Length")
    json_len = int(header_len) if header_len is not None else len(body)
    header = json.loads(body[:json_len])
    offset = json_len
    arrays = {}
    for out in header["outputs"]:
        shape = [int(d) for d in out["shape"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = body[offset:offset + size]
            assert len(raw) == size, f"{out['name']}: body ends before its {size} binary bytes"
            offset += size
            if out["datatype"] == "BYTES":
                arr = np.array(_bytes_elements(raw), dtype=np.object_)
            else:
                arr = np.frombuffer(raw, dtype=np.dtype(_NP_DTYPES[out["datatype"]]).newbyteorder("<"))
        else:
            data = out["data"]
            arr = np.array(data, dtype=np.object_ if out["datatype"] == "BYTES" else _NP_DTYPES[out["datatype"]])
        arrays[out["name"]] = arr.reshape(shape)
    assert offset == len(body), f"{len(body) - offset} unexplained bytes after the outputs"
    return header, arrays


def model_stats(stats: dict) -> dict:
    """model_stats[0] of Triton's statistics JSON (HTTP, or gRPC as_json), numbers as ints."""
    (entry,) = [s for s in stats["model_stats"] if s["name"] == MODEL]
    return entry


def stat_counts(entry: dict) -> dict:
    inf = entry.get("inference_stats", {})

    def n(section, key="count"):
        return int(section.get(key, 0))  # gRPC's as_json writes uint64 as strings, omits zeros

    return {
        "inference_count": int(entry.get("inference_count", 0)),
        "execution_count": int(entry.get("execution_count", 0)),
        "success": n(inf.get("success", {})),
        "fail": n(inf.get("fail", {})),
        "success_ns": n(inf.get("success", {}), "ns"),
        "batch_executions": sum(n(b.get("compute_infer", {})) for b in entry.get("batch_stats", [])),
        "batch_inferences": sum(int(b["batch_size"]) * n(b.get("compute_infer", {}))
                                for b in entry.get("batch_stats", [])),
    }


def assert_stats_grew(before: dict, after: dict, requests_made: int, images: int):
    b, a = stat_counts(before), stat_counts(after)
    assert a["success"] - b["success"] == requests_made, (b, a)
    assert a["inference_count"] - b["inference_count"] == images, (b, a)
    executions = a["execution_count"] - b["execution_count"]
    assert 1 <= executions <= images, (b, a)
    assert a["success_ns"] > b["success_ns"], (b, a)
    # batch_stats: one entry per executed batch size, adding up to the totals (Triton's meaning).
    assert a["batch_executions"] == a["execution_count"], a
    assert a["batch_inferences"] == a["inference_count"], a
