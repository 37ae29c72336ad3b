#!/usr/bin/env bash
# Gathers into target/device-bundle/ what a lent GPU machine lacks for benches/device-check.sh
# (`make device-bundle`; the Makefile builds the binaries first). That machine has bash and a
# python3 with torch 2.11.0+cu130, no Rust, no timm, no network; the bundle travels with the
# working tree through the device tool's `carry` (64 MiB for both, the tree is about 4 MiB):
#
#   bin/visionserve.xz         the release server, stripped (its debug line tables are ~130 MB)
#                              and xz-compressed (13 MB -> 4 MB; device-check.sh unpacks it)
#   bin/model-bench.xz         benches/model.rs (the model alone: upload, normalise, forward,
#                              softmax, top-k), the same way; absent if it was not built
#   models/tf_efficientnet_lite0/          config.json + model.safetensors (real weights, f32)
#   models/tf_efficientnetv2_s.int8/       config.json + packed.safetensors: the random-weight
#       parity checkpoint (timm, Hub layout) with every tensor of 4096+ values stored as int8
#       with a per-output-channel f32 scale (86 MB of f32 would not fit, 43 MB of f16 neither);
#       device-check.sh unpacks it back to an f32 model.safetensors. Only its speed is measured.
#   images/rocket.jpg          the photo the load generator posts (as `make bench`)
#   images/agree/NNN.jpg       AGREE_N (300) deterministic crops/flips of the test photos, for
#                              top-1 agreement of f16/bf16 with f32 on the real-weight Lite0
#   bundle.json                what is in it, with sizes and the git revision
#
# Usage: benches/device-bundle.sh RELEASE_DIR PYTHON PARITY_DIR TEST_DATA [OUT]
set -euo pipefail

release=${1:?release dir (…/target/release)}
python=${2:?python with torch, timm, Pillow, safetensors}
parity=${3:?parity fixture dir}
test_data=${4:?test data dir}
out=${5:-target/device-bundle}
agree_n=${AGREE_N:-300}
limit_mib=${BUNDLE_LIMIT_MIB:-58}

rm -rf "$out"
mkdir -p "$out/bin" "$out/models" "$out/images"

strip_copy() { # src dst
  objcopy --strip-all "$1" "$2"
  chmod 755 "$2"
}

strip_copy "$release/visionserve" "$out/bin/visionserve"
"$out/bin/visionserve" --help >/dev/null
# The newest benches/model.rs executable (cargo names it model-<hash>).
model_bench=$(find "$release/deps" -maxdepth 1 -type f -executable -regex '.*/model-[0-9a-f]+' -printf '%T@ %p\n' 2>/dev/null \
  | sort -nr | head -1 | cut -d' ' -f2-)
if [ -n "$model_bench" ]; then
  strip_copy "$model_bench" "$out/bin/model-bench"
  if ! "$out/bin/model-bench" --help 2>/dev/null | grep -q -- '--device'; then
    echo "warning: $model_bench has no --device flag (built before it was added?): the model-alone rows will be CPU only" >&2
  fi
  xz -T1 -6 "$out/bin/model-bench"
else
  echo "warning: no benches/model.rs executable under $release/deps (cargo bench --bench model --no-run): no model-alone rows" >&2
fi

xz -T1 -6 "$out/bin/visionserve"
# Optional: a stand-alone NVML scrape (the GPU collector of src/metrics/gpu.rs alone), to check
# the visionserve_gpu_* gauges even with a server built before them.
if [ -n "${NVML_SCRAPE:-}" ]; then
  cp "$NVML_SCRAPE" "$out/bin/nvml-scrape"
fi

mkdir -p "$out/models/tf_efficientnet_lite0"
cp weights/tf_efficientnet_lite0/config.json weights/tf_efficientnet_lite0/model.safetensors \
  "$out/models/tf_efficientnet_lite0/"

cp "$test_data/photos/rocket.jpg" "$out/images/rocket.jpg"

"$python" benches/device_check.py pack-int8 \
  --src "$parity/efficientnet/tf_efficientnetv2_s" --out "$out/models/tf_efficientnetv2_s.int8"
"$python" benches/device_check.py make-agreement-images \
  --photos "$test_data/photos" --out "$out/images/agree" --n "$agree_n"

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -q . && echo "+dirty" || true)
"$python" - "$out" "$git_rev$dirty" <<'EOF'
import json, os, sys
out, rev = sys.argv[1], sys.argv[2]
files = {}
for root, _, names in os.walk(out):
    for n in names:
        p = os.path.join(root, n)
        files[os.path.relpath(p, out)] = os.path.getsize(p)
manifest = {"git": rev, "total_bytes": sum(files.values()), "files": len(files),
            "largest": dict(sorted(files.items(), key=lambda kv: -kv[1])[:8])}
json.dump(manifest, open(os.path.join(out, "bundle.json"), "w"), indent=2)
EOF
total=$(du -sb "$out" | cut -f1)
echo "device bundle: $out, $(( total / 1048576 )) MiB ($total bytes)"
du -sh "$out"/bin/* "$out"/models/* "$out"/images/agree
if [ "$total" -gt $(( limit_mib * 1048576 )) ]; then
  echo "error: the bundle is over ${limit_mib} MiB (the device tool carries 64 MiB with the working tree)" >&2
  exit 1
fi
