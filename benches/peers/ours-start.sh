#!/usr/bin/env bash
# Start visionserve for the peer kit's run_all.sh (START_ours=this script): the kit's own ours/start.sh
# with the binary and the model folder taken from the environment instead of $VISIONSERVE_DIR/target/...
#   VISIONSERVE_BIN    the release binary (required)
#   VISIONSERVE_MODEL  the model folder to serve (required)
#   OURS_ARGS          extra server flags, e.g. "--max-batch-size 4 --max-batch-delay-ms 2"
#   OURS_ARGS_<label>  the flags for that label instead, trailing digits dropped (OURS_ARGS_ours_auto="--instances
#                      auto" serves ours_auto and ours_auto2: one configuration, run twice a round)
# run_all.sh runs it from the kit's folder, whose run/ holds the PID file and the log (run/$PEER_NAME.*);
# the kit's ours/stop.sh stops it.
set -euo pipefail
source "$PWD/lib.sh"
bin=${VISIONSERVE_BIN:?set VISIONSERVE_BIN to the release binary}
model=${VISIONSERVE_MODEL:?set VISIONSERVE_MODEL to the model folder}
name=${PEER_NAME:-ours}
log=$RUN_DIR/$name.log
own_args=OURS_ARGS_${name%"${name##*[!0-9]}"}
OURS_ARGS=${!own_args-${OURS_ARGS:-}}
# shellcheck disable=SC2086  # OURS_ARGS is a list of flags
"$bin" --host 127.0.0.1 --port 3000 --device cpu --model "$(basename "$model")=$model" ${OURS_ARGS:-} >"$log" 2>&1 &
pid=$!
echo "$pid" >"$RUN_DIR/$name.pids"
if ! wait_http http://127.0.0.1:3000/health/ready 300 "$pid"; then
  tail -20 "$log" >&2
  exit 1
fi
echo "$name up on http://127.0.0.1:3000/v1/classify ($bin, $model${OURS_ARGS:+, $OURS_ARGS}) pid: $pid"
