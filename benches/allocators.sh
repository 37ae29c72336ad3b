#!/usr/bin/env bash
# The model alone (benches/model.rs) under glibc malloc with the server's mmap/trim tuning,
# glibc with its defaults, jemalloc and mimalloc (both preloaded, so that libtorch's own
# allocations go through them too), interleaved in rounds; prints images/s per round.
#
#   benches/allocators.sh "MODEL_BENCH_COMMAND" MODEL_DIR [ROUNDS] [SECONDS]
set -euo pipefail
bench=$1 model=$2 rounds=${3:-3} seconds=${4:-5}
lib=/usr/lib/x86_64-linux-gnu
for so in libjemalloc.so.2 libmimalloc.so.2; do
  [ -e "$lib/$so" ] || { echo "missing $lib/$so (apt-get install libjemalloc2 libmimalloc2.0)" >&2; exit 1; }
done
run() { # NAME ENV=VALUE... -- BENCH_ARGS...
  local name=$1 envs=() out
  shift
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  out=$(env "${envs[@]}" $bench --model "$model" --batch-sizes 1,8 --seconds "$seconds" "$@" 2>/dev/null |
        grep -E '^\| ' | awk -F'|' '{gsub(/ /,"",$6); gsub(/ /,"",$7); printf "batch%s=%s/s ", $6, $7}')
  echo "round $round  $name  $out"
}
for round in $(seq 1 "$rounds"); do
  run glibc-tuned   X=1 --
  run glibc-default X=1 -- --no-malloc-tuning
  run jemalloc      LD_PRELOAD=$lib/libjemalloc.so.2 -- --no-malloc-tuning
  run mimalloc      LD_PRELOAD=$lib/libmimalloc.so.2 -- --no-malloc-tuning
done
