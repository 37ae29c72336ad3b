"""The GPU check's Python side (benches/device-check.sh runs it; see that file).

Subcommands:

  run                      on the GPU machine: serve each model at each dtype, load it at N
                           concurrent clients, time the model alone at the same batch sizes,
                           and compare f16/bf16 top-1 with f32; summary table + JSON.
  unpack-int8              on the GPU machine: packed.safetensors -> model.safetensors (f32).
  pack-int8                here (device-bundle.sh): a checkpoint's large tensors to int8.
  make-agreement-images    here (device-bundle.sh): deterministic crops/flips of the photos.

`run` and `unpack-int8` need only the standard library and torch (the GPU machine has no numpy
guarantee, no timm, no network); the load generator is processes of threads with keep-alive
`http.client` connections, closed loop, as benches/http.rs.
"""
import argparse
import base64
import ctypes
import http.client
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# safetensors without the safetensors package: 8-byte little-endian header length, JSON header,
# raw little-endian data.

_DTYPES = {
    "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
    "I64": ("int64", 8), "I32": ("int32", 4), "I8": ("int8", 1), "U8": ("uint8", 1),
}


def read_safetensors(path):
    import torch

    data = bytearray(Path(path).read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = getattr(torch, _DTYPES[info["dtype"]][0])
        if end == begin:
            t = torch.empty(info["shape"], dtype=dtype)
        else:
            t = torch.frombuffer(memoryview(data)[base + begin:base + end], dtype=dtype)
            t = t.reshape(info["shape"]).clone()
        tensors[name] = t
    return tensors, meta


def write_safetensors(path, tensors, meta=None):
    by_torch = {v[0]: k for k, v in _DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        raw = ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""
        header[name] = {"dtype": by_torch[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        chunks.append(raw)
        offset += nbytes
    header["__metadata__"] = dict(meta or {"format": "pt"})
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for c in chunks:
            f.write(c)


SCALE = ".__int8_scale__"


def pack_int8(args):
    """Floating tensors of 4096+ values (conv and linear weights) -> int8 with one f32 scale per
    output channel (max |w| / 127); the rest (norms, biases, counters) stay as they are. The
    rounding error is under 0.4 % of each channel's largest weight: irrelevant to speed, which
    is all this random-weight model is used for."""
    import torch

    src, out = Path(args.src), Path(args.out)
    tensors, _ = read_safetensors(src / "model.safetensors")
    packed = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() >= 4096 and t.dim() >= 2:
            w = t.float()
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127.0
            q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
            packed[name] = q
            packed[name + SCALE] = scale
        else:
            packed[name] = t
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", out / "config.json")
    write_safetensors(out / "packed.safetensors", packed, {"format": "pt", "visionserve": "int8 per-channel"})
    before = (src / "model.safetensors").stat().st_size
    after = (out / "packed.safetensors").stat().st_size
    print(f"{src.name}: {len(tensors)} tensors, {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (int8)")


def unpack_int8(args):
    src, out = Path(args.src), Path(args.out)
    packed, _ = read_safetensors(src / "packed.safetensors")
    tensors = {}
    for name, t in packed.items():
        if name.endswith(SCALE):
            continue
        scale = packed.get(name + SCALE)
        if scale is not None:
            t = t.float() * scale.view(-1, *([1] * (t.dim() - 1)))
        tensors[name] = t
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", out / "config.json")
    write_safetensors(out / "model.safetensors", tensors)
    print(f"unpacked {len(tensors)} tensors to {out}/model.safetensors "
          f"({(out / 'model.safetensors').stat().st_size / 2**20:.1f} MiB)")


def make_agreement_images(args):
    """n JPEGs: seeded random crops (30-100 % of the area, aspect 3:4 to 4:3), mirror images and
    resizes of the colour test photos, shorter side 256 px, JPEG quality 85."""
    import random

    from PIL import Image, ImageOps

    photos = sorted(p for p in Path(args.photos).iterdir()
                    if p.suffix.lower() in (".png", ".jpg") and "gray" not in p.name and "tiny" not in p.name
                    and not p.stem.startswith(("chelsea_", "logo", "camera")))
    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in photos]
    rng = random.Random(20261202)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        im = images[i % len(images)]
        w, h = im.size
        for _ in range(20):
            area = rng.uniform(0.3, 1.0) * w * h
            aspect = rng.uniform(3 / 4, 4 / 3)
            cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
            if cw <= w and ch <= h:
                break
        else:
            cw, ch = w, h
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        s = 256 / min(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * s)), max(1, round(crop.size[1] * s))), Image.BICUBIC)
        crop.save(out / f"{i:03d}.jpg", quality=85)
    print(f"{args.n} agreement images from {len(photos)} photos ({', '.join(p.name for p in photos)}) in {out}")


# ---------------------------------------------------------------------------------------------
# The server.

class Server:
    def __init__(self, binary, name, model_dir, device, dtype, log_path, extra=(), ready_timeout=180):
        self.name = name
        self.log_path = log_path
        cmd = [binary, "--host", "127.0.0.1", "--port", "0", "--model", f"{name}={model_dir}",
               "--device", device, "--dtype", dtype, "--log-format", "json", "--log", "warn,visionserve=info",
               *extra]
        self.cmd = cmd
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self.port = None
        self.ready_s = None
        deadline = self.started + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.why()}")
            if self.port is None:
                self.port = self._find_port()
            elif self._get("/health/ready")[0] == 200:
                self.ready_s = time.monotonic() - self.started
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready within {ready_timeout} s: {self.log_tail(5)}")

    def _find_port(self):
        for line in Path(self.log_path).read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            fields = event.get("fields", event)
            if fields.get("message") == "listening":
                return int(str(fields["address"]).rsplit(":", 1)[1])
        return None

    def why(self):
        """The last error the server logged, else the end of its log."""
        errors = [e.get("message", "") for e in self.log_events(None) if e.get("level") == "ERROR"]
        return errors[-1] if errors else self.log_tail(5)

    def log_tail(self, n=15):
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def log_events(self, message):
        events = []
        for line in Path(self.log_path).read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            fields = {**event, **event.get("fields", {})}
            if message is None or fields.get("message") == message:
                events.append(fields)
        return events

    def _get(self, path, timeout=10):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            c.close()
            return r.status, body
        except OSError:
            return None, b""

    def get_json(self, path):
        status, body = self._get(path)
        return json.loads(body) if status == 200 else None

    def metrics(self):
        status, body = self._get("/metrics")
        return body.decode(errors="replace") if status == 200 else ""

    def post_json(self, path, payload, timeout=120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}: {body[:300]!r}")
        return json.loads(body)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def scrape(text, name, model=None):
    """Sum of the samples of `name` (for `model` only if given)."""
    total = None
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m or m.group(1) != name:
            continue
        if model is not None and f'model="{model}"' not in (m.group(2) or ""):
            continue
        total = (total or 0.0) + float(m.group(3))
    return total


# ---------------------------------------------------------------------------------------------
# The load generator: P processes x T threads, each a closed-loop client on its own keep-alive
# connection; requests that end inside the window are counted.

def _client_thread(port, path, body, headers, t_begin, t_end, out):
    conn = None
    while time.time() < t_end:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            r.read()
            status = r.status
        except (OSError, http.client.HTTPException):
            status = None
            conn.close()
            conn = None
        end = time.time()
        if t_begin <= end <= t_end:
            out.append((time.perf_counter() - t0, status))
    if conn is not None:
        conn.close()


def _client_process(port, path, body, headers, threads, t_begin, t_end, queue):
    results = []
    cpu0 = time.process_time()
    ts = [threading.Thread(target=_client_thread, args=(port, path, body, headers, t_begin, t_end, results))
          for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    queue.put((results, time.process_time() - cpu0))


def load(server, image, clients, seconds, warmup, max_procs):
    path = f"/v1/models/{server.name}/classify?top_k=1"
    headers = {"Content-Type": "image/jpeg"}
    procs = max(1, min(clients, max_procs))
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    t_start = time.time() + 0.5
    t_begin, t_end = t_start + warmup, t_start + warmup + seconds
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    ps = [ctx.Process(target=_client_process, args=(server.port, path, image, headers, n, t_begin, t_end, queue))
          for n in per]
    for p in ps:
        p.start()
    time.sleep(max(0.0, t_begin - time.time()))
    m0 = server.metrics()
    time.sleep(max(0.0, t_end - time.time()))
    m1 = server.metrics()
    gathered = [queue.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(30)
    lat = sorted(l for res, _ in gathered for l, s in res if s == 200)
    errors = sum(1 for res, _ in gathered for _, s in res if s != 200)
    client_cpu = sum(c for _, c in gathered)

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 2) if lat else None

    def delta(name, model=True):
        a, b = scrape(m0, name, server.name if model else None), scrape(m1, name, server.name if model else None)
        return None if a is None or b is None else b - a

    bsum, bcount = delta("visionserve_batch_size_sum"), delta("visionserve_batch_size_count")
    server_cpu = delta("process_cpu_seconds_total", model=False)
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(lat),
        "errors": errors,
        "images_per_s": round(len(lat) / seconds, 1),
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
        "mean_batch": round(bsum / bcount, 2) if bcount else None,
        "server_cpu_cores": round(server_cpu / seconds, 2) if server_cpu is not None else None,
        "client_cpu_cores": round(client_cpu / (seconds + warmup), 2),
        "client_processes": procs,
        "gpu_metrics": [l for l in m1.splitlines() if l.startswith("visionserve_gpu_")],
    }


# ---------------------------------------------------------------------------------------------
# The model alone: benches/model.rs.

_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*(\d+)x(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def model_bench(binary, model_dir, device, dtype, batch_sizes, seconds, timeout, log_path):
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    cmd = [binary, "--model", str(model_dir), "--batch-sizes", ",".join(map(str, batch_sizes)),
           "--seconds", str(seconds)]
    if "--device" in help_text:
        cmd += ["--device", device, "--dtype", dtype]
    elif device != "cpu" or dtype != "f32":
        return {"error": "this model-bench binary predates --device/--dtype: rebuild it (cargo bench --bench model --no-run)"}
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        Path(log_path).write_text(f"{cmd}\nTIMEOUT\n{e.stdout or ''}\n{e.stderr or ''}")
        return {"error": f"timed out after {timeout} s", "cmd": cmd}
    Path(log_path).write_text(f"{cmd}\nrc={p.returncode}\n{p.stdout}\n{p.stderr}")
    rows = {}
    for line in p.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            rows[int(m.group(6))] = {"images_per_s": float(m.group(7)), "ms_per_batch": float(m.group(8)),
                                     "backend": m.group(2), "input": f"{m.group(3)}x{m.group(4)}"}
    out = {"batches": rows, "wall_s": round(time.monotonic() - t0, 1), "cmd": cmd}
    if p.returncode != 0:
        out["error"] = f"exit {p.returncode}: {p.stderr.strip().splitlines()[-3:] if p.stderr.strip() else ''}"
    return out


# ---------------------------------------------------------------------------------------------
# f16/bf16 vs f32: top-5 of every agreement image.

def classify_all(server, images, per_request=25):
    out = []
    for i in range(0, len(images), per_request):
        chunk = images[i:i + per_request]
        body = server.post_json(f"/v1/models/{server.name}/classify",
                                {"images": [base64.b64encode(b).decode() for b in chunk], "top_k": 5})
        for r in body["results"]:
            preds = r["predictions"]
            out.append({"top5": [p["index"] for p in preds], "score": preds[0].get("score")})
    return out


def agreement(reference, other):
    n = min(len(reference), len(other))
    top1 = sum(reference[i]["top5"][0] == other[i]["top5"][0] for i in range(n))
    in5 = sum(other[i]["top5"][0] in reference[i]["top5"] for i in range(n))
    dscore = [abs(reference[i]["score"] - other[i]["score"]) for i in range(n)
              if reference[i]["top5"][0] == other[i]["top5"][0] and reference[i]["score"] is not None]
    return {"images": n, "top1_agree": top1, "top1_agree_ratio": round(top1 / n, 4) if n else None,
            "top1_in_f32_top5": in5,
            "max_abs_top1_prob_diff": round(max(dscore), 5) if dscore else None,
            "mean_abs_top1_prob_diff": round(sum(dscore) / len(dscore), 6) if dscore else None}


# ---------------------------------------------------------------------------------------------

def run(args):
    t0 = time.monotonic()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle)
    binary = str(Path(args.bin_dir) / "visionserve")
    bench_bin = Path(args.bin_dir) / "model-bench"
    image = (bundle / "images" / "rocket.jpg").read_bytes()
    agree_files = sorted((bundle / "images" / "agree").glob("*.jpg"))[:args.agree_n]
    agree_images = [p.read_bytes() for p in agree_files]
    models = {}
    for spec in args.models.split(","):
        name, path = spec.split("=", 1)
        models[name] = path
    dtypes = args.dtypes.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    report = {"device": args.device, "dtypes": dtypes, "models": models, "concurrency": concurrency,
              "batch_sizes": batch_sizes, "seconds": args.seconds, "warmup_seconds": args.warmup,
              "server_args": args.server_args.split(), "runs": [], "agreement": {}, "skipped": []}
    top5 = {}  # dtype -> results on the agreement images (the agreement model only)

    def left():
        return args.deadline - (time.monotonic() - t0)

    for dtype in dtypes:
        for name, path in models.items():
            entry = {"model": name, "dtype": dtype}
            report["runs"].append(entry)
            # Rough cost: start-up and warm-up, then the rows; skip what cannot finish in time.
            need = 25 + len(concurrency) * (args.seconds + args.warmup + 1.5)
            if left() < need:
                entry["skipped"] = f"{left():.0f} s left, about {need:.0f} s needed"
                report["skipped"].append(f"server {name} {dtype}")
                print(f"[{time.monotonic() - t0:6.1f}s] skip server {name} {dtype}: {entry['skipped']}", flush=True)
            else:
                print(f"[{time.monotonic() - t0:6.1f}s] server {name} {dtype} ...", flush=True)
                try:
                    # "f16+i2": f16 with --instances 2 (two model threads overlapping upload,
                    # compute and download on one GPU).
                    kind, _, instances = dtype.partition("+i")
                    extra = args.server_args.split() + (["--instances", instances] if instances else [])
                    server = Server(binary, name, path, args.device, kind, logs / f"server-{name}-{dtype}.log",
                                    extra, ready_timeout=min(240, max(30, left() - 20)))
                except RuntimeError as e:
                    entry["server_error"] = str(e)
                    print(f"    server failed: {e}", flush=True)
                    server = None
                if server is not None:
                    try:
                        entry["ready_s"] = round(server.ready_s, 1)
                        info = server.get_json(f"/v1/models/{name}") or {}
                        entry["model_info"] = {k: info.get(k) for k in
                                               ("architecture", "backend", "device", "dtype", "input_size",
                                                "max_batch_size", "batching") if k in info}
                        warm = server.log_events("model loaded and warmed up")
                        if warm:
                            entry["warmup_log"] = {k: v for k, v in warm[-1].items()
                                                   if k not in ("message", "timestamp", "level", "target", "fields")}
                        if name == args.agree_model and agree_images:
                            ta = time.monotonic()
                            top5[dtype] = classify_all(server, agree_images)
                            entry["agreement_images_s"] = round(time.monotonic() - ta, 2)
                        entry["load"] = []
                        for c in concurrency:
                            row = load(server, image, c, args.seconds, args.warmup, args.max_client_procs)
                            entry["load"].append(row)
                            print(f"    {c:4d} clients: {row['images_per_s']:9.1f} img/s  p50 {row['p50_ms']} ms  "
                                  f"p99 {row['p99_ms']} ms  batch {row['mean_batch']}  errors {row['errors']}  "
                                  f"server cpu {row['server_cpu_cores']}  client cpu {row['client_cpu_cores']}",
                                  flush=True)
                        entry["gpu_metrics"] = entry["load"][-1]["gpu_metrics"] if entry["load"] else []
                    except Exception as e:  # keep going: the other rows are still worth having
                        entry["error"] = f"{type(e).__name__}: {e}"
                        print(f"    error: {entry['error']}", flush=True)
                    finally:
                        server.stop()
            # The model alone at the same dtype (once per dtype: instances change only the server).
            need = 10 + len(batch_sizes) * (args.bench_seconds + 4)
            if "+i" in dtype:
                entry["model_alone"] = {"skipped": "same as the plain dtype"}
            elif not bench_bin.exists():
                entry["model_alone"] = {"error": "no model-bench in the bundle"}
            elif left() < need:
                entry["model_alone"] = {"skipped": f"{left():.0f} s left, about {need:.0f} s needed"}
                report["skipped"].append(f"model-alone {name} {dtype}")
            else:
                print(f"[{time.monotonic() - t0:6.1f}s] model alone {name} {dtype} ...", flush=True)
                entry["model_alone"] = model_bench(str(bench_bin), path, args.device, dtype, batch_sizes,
                                                   args.bench_seconds, timeout=max(30, min(240, left() - 10)),
                                                   log_path=logs / f"model-{name}-{dtype}.log")
                for b, r in sorted(entry["model_alone"].get("batches", {}).items()):
                    print(f"    batch {b:4d}: {r['images_per_s']:9.1f} img/s  {r['ms_per_batch']} ms/batch", flush=True)
                if "error" in entry["model_alone"]:
                    print(f"    model alone: {entry['model_alone']['error']}", flush=True)
            # What is done so far, in case the run is cut short.
            report["wall_s"] = round(time.monotonic() - t0, 1)
            (out / "device-check.json").write_text(json.dumps(report, indent=2))

    if "f32" in top5:
        for dtype, res in top5.items():
            if dtype != "f32":
                report["agreement"][dtype] = agreement(top5["f32"], res)
        report["agreement_model"] = args.agree_model
    report["wall_s"] = round(time.monotonic() - t0, 1)
    (out / "device-check.json").write_text(json.dumps(report, indent=2))
    summary = summarize(report)
    (out / "summary.md").write_text(summary)
    print(summary, flush=True)
    return 0


def summarize(report):
    lines = [f"## device check: {report['device']}, {report['wall_s']} s", "",
             "End to end (POST /v1 rocket.jpg, closed loop) next to the model alone (benches/model.rs) "
             "at batch = clients (the server's own batches stop at its --max-batch-size: 32 on CUDA, "
             "8 on CPU, by default; see mean batch):", "",
             "| model | dtype | clients | images/s | p50 ms | p99 ms | errors | mean batch | server CPU | "
             "model alone images/s (batch) | e2e / alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["runs"]:
        alone = e.get("model_alone", {}).get("batches", {})
        if "load" not in e:
            why = e.get("skipped") or e.get("server_error", "") or e.get("error", "")
            lines.append(f"| {e['model']} | {e['dtype']} | - | {why.splitlines()[0][:100] if why else 'n/a'} "
                         "| | | | | | | |")
        for r in e.get("load", []):
            a = alone.get(r["clients"])
            ratio = f"{r['images_per_s'] / a['images_per_s']:.2f}" if a and a["images_per_s"] else ""
            lines.append(f"| {e['model']} | {e['dtype']} | {r['clients']} | {r['images_per_s']} | {r['p50_ms']} | "
                         f"{r['p99_ms']} | {r['errors']} | {r['mean_batch']} | {r['server_cpu_cores']} | "
                         f"{a['images_per_s'] if a else ''} | {ratio} |")
    lines += ["", "Model alone (benches/model.rs: upload, normalise, forward, softmax, top-5):", "",
              "| model | dtype | batch | images/s | ms/batch |", "|---|---|---|---|---|"]
    for e in report["runs"]:
        ma = e.get("model_alone", {})
        for b, r in sorted(ma.get("batches", {}).items()):
            lines.append(f"| {e['model']} | {e['dtype']} | {b} | {r['images_per_s']} | {r['ms_per_batch']} |")
        if "error" in ma or "skipped" in ma:
            lines.append(f"| {e['model']} | {e['dtype']} | - | {ma.get('error') or ma.get('skipped')} | |")
    if report["agreement"]:
        lines += ["", f"Agreement with f32 ({report.get('agreement_model')}, real weights):", "",
                  "| dtype | images | top-1 agree | top-1 within f32 top-5 | max / mean abs diff of top-1 prob |",
                  "|---|---|---|---|---|"]
        for dtype, a in report["agreement"].items():
            lines.append(f"| {dtype} | {a['images']} | {a['top1_agree']} ({a['top1_agree_ratio']}) | "
                         f"{a['top1_in_f32_top5']} | {a['max_abs_top1_prob_diff']} / {a['mean_abs_top1_prob_diff']} |")
    gpu = next((e["gpu_metrics"] for e in report["runs"] if e.get("gpu_metrics")), None)
    lines += ["", "GPU gauges at the end of a load row: " + ("; ".join(gpu) if gpu else "none exported")]
    if report["skipped"]:
        lines += ["", "Skipped for time: " + ", ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--bundle", required=True)
    r.add_argument("--bin-dir", required=True, help="visionserve and model-bench, unpacked")
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cuda:0")
    r.add_argument("--models", required=True, help="name=dir,...")
    r.add_argument("--agree-model", default="lite0")
    r.add_argument("--dtypes", default="f32,f16,bf16")
    r.add_argument("--concurrency", default="1,8,32,128")
    r.add_argument("--batch-sizes", default="1,8,32,128")
    r.add_argument("--seconds", type=float, default=3.0)
    r.add_argument("--warmup", type=float, default=0.5)
    r.add_argument("--bench-seconds", type=float, default=1.5)
    r.add_argument("--agree-n", type=int, default=300)
    r.add_argument("--max-client-procs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    r.add_argument("--server-args", default="")
    r.add_argument("--deadline", type=float, default=400.0, help="seconds for the whole run")
    r.set_defaults(fn=run)
    for name, fn in (("pack-int8", pack_int8), ("unpack-int8", unpack_int8)):
        s = sub.add_parser(name)
        s.add_argument("--src", required=True)
        s.add_argument("--out", required=True)
        s.set_defaults(fn=fn)
    a = sub.add_parser("make-agreement-images")
    a.add_argument("--photos", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--n", type=int, default=300)
    a.set_defaults(fn=make_agreement_images)
    args = p.parse_args()
    sys.exit(args.fn(args) or 0)


if __name__ == "__main__":
    main()
