#!/usr/bin/env bash
# Start visionserve for the peer kit's run_all.sh (START_ours=this script): the kit's own ours/start.sh
# with the binary and the model folder taken from the environment instead of $VISIONSERVE_DIR/target/...
#   VISIONSERVE_BIN    the release binary (required)
#   VISIONSERVE_MODEL  the model folder to serve (required)
#   OURS_FLAGS_<label> that label's server flags, e.g. "--instances 1", as benches/peers.sh resolved them
#                      from OURS_ARGS and OURS_ARGS_<label> (see there)
# run_all.sh runs it from the kit's folder, whose run/ holds the PID file and the log (run/$PEER_NAME.*);
# the kit's ours/stop.sh stops it.
set -euo pipefail
source "$PWD/lib.sh"
bin=${VISIONSERVE_BIN:?set VISIONSERVE_BIN to the release binary}
model=${VISIONSERVE_MODEL:?set VISIONSERVE_MODEL to the model folder}
name=${PEER_NAME:-ours}
log=$RUN_DIR/$name.log
flags_var=OURS_FLAGS_$name
flags=${!flags_var?benches/peers.sh sets $flags_var}
# shellcheck disable=SC2086  # a list of flags
"$bin" --host 127.0.0.1 --port 3000 --device cpu --model "$(basename "$model")=$model" $flags >"$log" 2>&1 &
pid=$!
echo "$pid" >"$RUN_DIR/$name.pids"
if ! wait_http http://127.0.0.1:3000/health/ready 300 "$pid"; then
  tail -20 "$log" >&2
  exit 1
fi
echo "$name up on http://127.0.0.1:3000/v1/classify ($bin, $model${flags:+, $flags}) pid: $pid"
