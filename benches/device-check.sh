#!/usr/bin/env bash
# The GPU check (`make device-check`), run on a lent GPU machine from the repository root, with
# target/device-bundle (made here by `make device-bundle`) carried along. Needs only bash,
# python3 with torch (for its libtorch and CUDA libraries) and the bundle: no Rust, no network.
#
#   1. points the bundled server at that machine's own libtorch (LD_LIBRARY_PATH; the binary's
#      RUNPATH names this build machine's venv, which does not exist there) and prints
#      nvidia-smi, the torch/CUDA versions and ldd;
#   2. unpacks the random-weight tf_efficientnetv2_s checkpoint (int8 in the bundle) to f32;
#   3. for each dtype (f32, f16, bf16, and f16 with --instances 2) and model (Lite0 with real weights, v2-S): starts the
#      server, classifies the agreement images (Lite0), loads it at 1/8/32/128 closed-loop
#      clients (POST /v1 of rocket.jpg, ROW_SECONDS per row), then times the model alone
#      (benches/model.rs) at batch 1/8/32/128 on the same device and dtype;
#   4. prints a summary table (also $OUT/summary.md) and writes $OUT/device-check.json, with
#      the server and model-bench logs under $OUT/logs.
#
# Everything is bounded by DEADLINE seconds (default 330): what would not finish is skipped
# and listed. Overrides (environment): DEVICE (cuda:0; cpu for a dry run here), DTYPES,
# MODELS (lite0,v2s), CONCURRENCY, BATCH_SIZES, ROW_SECONDS, WARMUP, BENCH_SECONDS, AGREE_N,
# SERVER_ARGS, BUNDLE, PYTHON, OUT.
set -uo pipefail

cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-target/device-bundle}
OUT=${OUT:-target/device-check}
DEVICE=${DEVICE:-cuda:0}
DTYPES=${DTYPES:-f32,f16,bf16,f16+i2}
MODELS=${MODELS:-lite0,v2s}
CONCURRENCY=${CONCURRENCY:-1,8,32,128}
BATCH_SIZES=${BATCH_SIZES:-1,8,32,128}
SECONDS_PER_ROW=${ROW_SECONDS:-3}
WARMUP=${WARMUP:-0.5}
BENCH_SECONDS=${BENCH_SECONDS:-1.5}
AGREE_N=${AGREE_N:-300}
SERVER_ARGS=${SERVER_ARGS:-}
DEADLINE=${DEADLINE:-330}
mkdir -p "$OUT"
start=$(date +%s)

if [ ! -f "$BUNDLE/bin/visionserve.xz" ]; then
  echo "no $BUNDLE/bin/visionserve.xz: run 'make device-bundle' here and carry target/device-bundle" >&2
  exit 2
fi

# A python3 with torch: the one on PATH, else the usual suspects.
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3 python3.12 python /usr/bin/python3 /opt/conda/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "no python3 with torch found (set PYTHON=...)" >&2
  exit 2
fi
torch_dir=$("$PYTHON" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Scratch space for the unpacked binaries and the v2-S checkpoint (not under $OUT: whatever is
# there is copied back).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
for b in visionserve model-bench; do
  [ -f "$BUNDLE/bin/$b.xz" ] || continue
  "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$BUNDLE/bin/$b.xz" "$work/bin/$b" || xz -dc "$BUNDLE/bin/$b.xz" > "$work/bin/$b"
  chmod 755 "$work/bin/$b"
done

{
  echo "== $(date -u +%FT%TZ) $(hostname) $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "== bundle: $(cat "$BUNDLE/bundle.json" 2>/dev/null | tr -d '\n' | cut -c1-200)"
  echo "== torch: $torch_dir"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'
  echo "== nvidia-smi"
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
  echo "== ldd visionserve (libtorch must resolve to the torch above)"
  ldd "$work/bin/visionserve" | grep -E '^\s*(libtorch|libc10|libstdc)|not found'
  if [ -x "$BUNDLE/bin/nvml-scrape" ]; then
    echo "== nvml-scrape (GPU gauges, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}, CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER-<unset>})"
    "$BUNDLE/bin/nvml-scrape" 2>/dev/null
  fi
  echo "== visionserve --version"
  "$work/bin/visionserve" --version 2>&1 | head -3
} 2>&1 | tee "$OUT/environment.txt"

# The models: Lite0 as it is; v2-S unpacked to f32 in the scratch folder.
model_specs=""
for m in ${MODELS//,/ }; do
  case $m in
    lite0) spec="lite0=$BUNDLE/models/tf_efficientnet_lite0" ;;
    v2s)
      "$PYTHON" benches/device_check.py unpack-int8 --src "$BUNDLE/models/tf_efficientnetv2_s.int8" \
        --out "$work/tf_efficientnetv2_s" || { echo "unpacking v2s failed" >&2; continue; }
      spec="v2s=$work/tf_efficientnetv2_s" ;;
    *=*) spec=$m ;;
    *) echo "unknown model $m (lite0, v2s or name=dir)" >&2; continue ;;
  esac
  model_specs="${model_specs:+$model_specs,}$spec"
done

elapsed=$(( $(date +%s) - start ))
"$PYTHON" benches/device_check.py run --bundle "$BUNDLE" --bin-dir "$work/bin" --out "$OUT" --device "$DEVICE" \
  --models "$model_specs" --dtypes "$DTYPES" --concurrency "$CONCURRENCY" --batch-sizes "$BATCH_SIZES" \
  --seconds "$SECONDS_PER_ROW" --warmup "$WARMUP" --bench-seconds "$BENCH_SECONDS" --agree-n "$AGREE_N" \
  --server-args "$SERVER_ARGS" --deadline $(( DEADLINE - elapsed ))
rc=$?
echo "device check: exit $rc after $(( $(date +%s) - start )) s; results in $OUT (device-check.json, summary.md, logs/)"
exit $rc
