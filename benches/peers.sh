#!/usr/bin/env bash
# visionserve against the servers a user would pick instead (TorchServe 0.12, FastAPI + timm), with the
# peer kit (BENCH_PEERS_SRC, its README.md says what it measures and how): ROUNDS interleaved passes of the
# kit's run_all.sh, the kit's ratio.py after each, then medians per server and concurrency and
# visionserve / best peer (benches/peers/medians.py).
#   VISIONSERVE_BIN=target/release/visionserve benches/peers.sh
# Environment (all optional except VISIONSERVE_BIN):
#   ROUNDS=3  DURATION=10 (s per measured run)  WARMUP=5  CONCURRENCY=1,8,32  MAX_WAIT_QUIET=600 (s, the kit's quiet.py)
#   PEERS="torchserve_2w ours fastapi_2w ours2"  (labels ours* are visionserve; the kit's variants: fastapi
#     fastapi_2w torchserve torchserve_b1 torchserve_2w, and its plain OpenVINO peers fastapi_ov_2w (f32) and
#     fastapi_ovbf_2w (OpenVINO's default precision), 2 uvicorn workers serving one request at a time each).
#     Each round starts one further along this list.
#     Labels that differ only in trailing digits (ours, ours2) are one configuration, pooled in the medians.
#     ovtuned (ovtuned2, ...): the tuned OpenVINO peer, a stand-in for OpenVINO Model Server
#     (benches/peers/ov_tuned: one process, THROUGHPUT hint, AsyncInferQueue, preprocessing in a thread pool,
#     on 127.0.0.1:8001), f32; ovtunedbf (ovtunedbf2, ...): the same with OpenVINO's default precision (bf16
#     on CPUs that have it). Trailing digits are the copy number here too: the medians pool a peer's copies.
#   MODEL=tf_efficientnet_lite0 | tf_efficientnetv2_b0 | coatnet_nano_rw_224 (the kit's models; the last two
#     have random weights). Every server serves the same model: visionserve the kit's Hub folder (Lite0: the
#     project's weights/tf_efficientnet_lite0, as the kit's ours/start.sh does), FastAPI the same folder,
#     TorchServe its TorchScript file.
#   OURS_ARGS="..."  extra visionserve flags        VISIONSERVE_MODEL  serve this folder instead
#   OURS_ARGS_<label>="..."  that label's flags (trailing digits dropped) instead of OURS_ARGS, to compare
#     configurations in one pass (a label must end in a letter: ours_bf16 would read OURS_ARGS_ours_bf;
#     an ours_* label without its variable is refused):
#     PEERS="fastapi_2w ours torchserve_2w ours_one ours2 ours_one2" OURS_ARGS_ours_one="--instances 1" ...
#   MODEL_BENCH="cargo bench -q --bench model --"  after each round, time visionserve's model alone at batch 8,
#     one copy with every thread and two copies with half each (as --instances auto's pool), for the medians'
#     "model / best peer" lines: how far ahead of the peers the model alone ran in that round
#   MALLOC_TUNED=1   glibc malloc tuned for every server (the kit's README; MALLOC_TUNED= for glibc defaults)
#   KIT=target/bench-peers (the writable copy, made and set up on first use)  OUT=$KIT/results/peers-<time>
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${VISIONSERVE_BIN:?set VISIONSERVE_BIN to the release binary}
[[ -x $bin ]] || { echo "no binary at $bin (cargo test --release --no-run)" >&2; exit 1; }
src=$(realpath -m "${BENCH_PEERS_SRC:-$repo/../shared/bench-peers}")
kit=$(realpath -m "${KIT:-$repo/target/bench-peers}")
model=${MODEL:-tf_efficientnet_lite0}
export ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} WARMUP=${WARMUP:-5} CONCURRENCY=${CONCURRENCY:-1,8,32}
export MAX_WAIT_QUIET=${MAX_WAIT_QUIET:-600} MALLOC_TUNED=${MALLOC_TUNED-1} OURS_ARGS=${OURS_ARGS:-}
# shellcheck disable=SC2206  # a list of names
peers=(${PEERS:-torchserve_2w ours fastapi_2w ours2})
# Each visionserve label's flags, resolved here once and handed to ours-start.sh as OURS_FLAGS_<label>:
# OURS_ARGS_<label without its trailing digits>, the digits being the copy number (ours_one2 is
# ours_one's second copy); plain ours (ours2, ...) takes OURS_ARGS. A label with no such variable
# would silently run with OURS_ARGS, so refuse it: "ours_bf16" reads OURS_ARGS_ours_bf.
for p in "${peers[@]}"; do
  [[ $p == ours* ]] || continue
  config=${p%"${p##*[!0-9]}"}
  args_var=OURS_ARGS_$config
  if [[ $config == ours ]]; then
    export "OURS_FLAGS_$p=$OURS_ARGS"
  elif [[ -n ${!args_var+set} ]]; then
    export "OURS_FLAGS_$p=${!args_var}"
  else
    echo "label $p runs with \$$args_var, which is not set (trailing digits are the copy number:" \
      "name the label so that it ends in a letter, e.g. ${p}x, and set OURS_ARGS_${p}x)" >&2
    exit 2
  fi
done
out=$(realpath -m "${OUT:-$kit/results/peers-$(date +%Y%m%d-%H%M%S)}")
# The Makefile's VENV (the project's torch venv) must not reach the kit's lib.sh, which reads VENV too.
unset VENV

# The kit writes its venv, models, run/ and results/ next to its scripts: copy it once. New files of the
# kit are added later; nothing there is overwritten (.venv, models, local fixes).
if [[ ! -f $kit/run_all.sh ]] || [[ -n $(cd "$src" && find . -type f | while read -r f; do [[ -e $kit/$f ]] || echo "$f"; done) ]]; then
  [[ -f $src/run_all.sh ]] || { echo "no peer kit at $src (set BENCH_PEERS_SRC)" >&2; exit 1; }
  mkdir -p "$kit"
  cp -rn "$src/." "$kit/"
  chmod -R u+w "$kit"
fi
# rt/site: the OpenVINO runtime of the fastapi_ov*/ovtuned* peers, missing from copies set up before it existed.
if [[ ! -x $kit/.venv/bin/python || ! -f $kit/models/manifest.json || ! -d $kit/rt/site/openvino ]] ||
  ! command -v wrk >/dev/null; then
  echo "setting up the peer kit in $kit (apt wrk/hey, a ~5 GB venv from PyPI, models): about 10 minutes"
  (unset VIRTUAL_ENV; "$kit/setup.sh")
fi
[[ -f $kit/models/$model.pt && -d $kit/models/$model ]] || {
  echo "unknown MODEL $model (the kit has: $(cd "$kit/models" && ls -d -- */ | tr -d / | tr '\n' ' '))" >&2; exit 2; }

# Which model visionserve serves.
if [[ -z ${VISIONSERVE_MODEL:-} ]]; then
  if [[ $model == tf_efficientnet_lite0 && -f $repo/weights/tf_efficientnet_lite0/config.json ]]; then
    VISIONSERVE_MODEL=$repo/weights/tf_efficientnet_lite0
  else
    VISIONSERVE_MODEL=$kit/models/$model
  fi
fi
export VISIONSERVE_BIN=$bin VISIONSERVE_MODEL

# The kit's TorchServe and FastAPI peers load models/tf_efficientnet_lite0{.pt,/}. For another model, run
# the kit from a folder of links to it whose models/ points those names at the chosen model's files.
run_dir=$kit
if [[ $model != tf_efficientnet_lite0 ]]; then
  run_dir=$kit-$model
  rm -rf "$run_dir"
  mkdir -p "$run_dir/models"
  for f in "$kit"/* "$kit"/.gitignore; do
    case ${f##*/} in models | run | results) ;; *) cp -rs "$f" "$run_dir/" ;; esac
  done
  ln -s "$kit/.venv" "$run_dir/.venv"
  for f in "$kit"/models/*.json "$kit"/models/*.jpg "$kit"/models/*.png; do ln -s "$f" "$run_dir/models/"; done
  ln -s "$kit/models/$model.pt" "$run_dir/models/tf_efficientnet_lite0.pt"
  ln -s "$kit/models/$model" "$run_dir/models/tf_efficientnet_lite0"
fi

for p in "${peers[@]}"; do
  if [[ $p == ours* ]]; then
    export "URL_$p=http://127.0.0.1:3000/v1/classify" "START_$p=$repo/benches/peers/ours-start.sh" "STOP_$p=ours/stop.sh"
  fi
  # The tuned OpenVINO peer: ovtuned* f32, ovtunedbf* OpenVINO's default precision (digits: copy number).
  case ${p%"${p##*[!0-9]}"} in
    ovtuned) precision=f32 ;;
    ovtunedbf) precision=default ;;
    *) continue ;;
  esac
  export "URL_$p=http://127.0.0.1:${OV_TUNED_PORT:-8001}/predict" "PEER_PRECISION_$p=$precision" \
    "START_$p=$repo/benches/peers/ov_tuned/start.sh" "STOP_$p=$repo/benches/peers/ov_tuned/stop.sh"
done

echo "peers: ${peers[*]}; model $model (visionserve: $VISIONSERVE_MODEL${OURS_ARGS:+, $OURS_ARGS}); $ROUNDS round(s) x" \
  "c=$CONCURRENCY x ${DURATION}s (+${WARMUP}s warm-up); results in $out"
mkdir -p "$out"
# Which flags each visionserve label ran with, kept beside the results (they show nowhere else in them).
env | { grep '^OURS_FLAGS_' || true; } | sort | tee "$out/configurations.txt"
start=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  k=$(((round - 1) % ${#peers[@]}))
  order=("${peers[@]:k}" "${peers[@]:0:k}")
  echo "=== round $round/$ROUNDS: ${order[*]}"
  # The full output goes to the round's log; the result lines, and why a run waits, are shown as they come.
  PEERS="${order[*]}" SKIP_MODEL=1 OUT="$out/round-$round" "$run_dir/run_all.sh" 2>&1 | tee "$out/round-$round.log" |
    { grep --line-buffered -E '^\S+ +[0-9]+ +[0-9.]+ |^quiet.py: .*waiting|^\S+: c=[0-9]+ run disturbed' || true; } ||
    { tail -40 "$out/round-$round.log" >&2; echo "round $round failed: $out/round-$round.log" >&2; exit 1; }
  if [[ -n ${MODEL_BENCH:-} ]]; then
    # Written aside and moved into place whole, so that a failed bench leaves no partial figure behind.
    # shellcheck disable=SC2086  # MODEL_BENCH is a command line
    (cd "$repo" && $MODEL_BENCH --model "$VISIONSERVE_MODEL" --batch-sizes 8 --seconds 5 &&
      $MODEL_BENCH --model "$VISIONSERVE_MODEL" --batch-sizes 8 --seconds 5 --instances 2) >"$out/round-$round/model_alone.tmp" ||
      { echo "MODEL_BENCH failed: $out/round-$round/model_alone.tmp" >&2; exit 1; }
    mv "$out/round-$round/model_alone.tmp" "$out/round-$round/model_alone.md"
    grep '^| ' "$out/round-$round/model_alone.md" | grep -v -e '^| arch' -e '^|---' || true
  fi
  echo "round $round: $("$kit/.venv/bin/python" "$kit/ratio.py" "$out/round-$round") ($((SECONDS - start)) s so far)"
done
"$kit/.venv/bin/python" "$repo/benches/peers/medians.py" "$out" | tee "$out/medians.txt"
