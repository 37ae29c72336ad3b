#!/usr/bin/env bash
# A server's resident memory and warm-up time for one model and flags: start it, wait until ready,
# send three requests, read process_resident_memory_bytes and visionserve_model_warmup_seconds from
# /metrics, stop it. One run: compare configurations by running them one after the other, and
# read warm-up times as indications only (the host's speed drifts).
#
#   benches/memory.sh target/release/visionserve MODEL_DIR --instances auto
#   benches/memory.sh target/release/visionserve MODEL_DIR --instances 1
set -euo pipefail
bin=$1; model=$2; shift 2
port=${PORT:-3112}
image=${IMAGE:-target/test-data/photos/rocket.jpg}
"$bin" --port "$port" --device cpu --model "m=$model" "$@" >/tmp/visionserve-memory.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "localhost:$port/health/ready" >/dev/null && break; sleep 1; done
curl -sf "localhost:$port/health/ready" >/dev/null || { echo "not ready; see /tmp/visionserve-memory.log" >&2; exit 1; }
for _ in 1 2 3; do
  curl -sf -o /dev/null -H 'content-type: image/jpeg' --data-binary "@$image" "localhost:$port/v1/classify"
done
metrics=$(curl -sf "localhost:$port/metrics")
rss=$(awk '/^process_resident_memory_bytes/ {printf "%.0f", $2 / 1048576}' <<<"$metrics")
warmup=$(awk '/^visionserve_model_warmup_seconds/ {printf "%.1f", $2}' <<<"$metrics")
echo "$(basename "$model") $*: RSS ${rss} MiB, warm-up ${warmup} s"
