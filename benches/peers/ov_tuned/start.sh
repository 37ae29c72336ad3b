#!/usr/bin/env bash
# Start the tuned OpenVINO peer (server.py: one uvicorn process, THROUGHPUT hint, AsyncInferQueue) in the
# background, bound to 127.0.0.1 only, for the peer kit's run_all.sh (START_<label>=this script; it runs it
# from the kit's folder, $KIT or $KIT-<model>, whose lib.sh, .venv, rt/site, models/ and run/ it uses).
#   PIDs -> run/$PEER_NAME.pids ; log -> run/$PEER_NAME.log ; ONNX export cached in run/
# Environment (all optional):
#   PEER_NAME=ovtuned (pid/log file stem)   OV_TUNED_PORT=8001
#   PEER_PRECISION_<PEER_NAME>, else PEER_PRECISION: f32 (default) | default (OpenVINO's choice, bf16 on
#     CPUs that have it); benches/peers.sh sets PEER_PRECISION_<label> for its ovtuned* labels
#   PEER_MODEL_DIR=models/tf_efficientnet_lite0 (the kit's, as its FastAPI peer)
set -euo pipefail
[[ -f $PWD/lib.sh && -d $PWD/models ]] || { echo "run from the peer kit's folder (as its run_all.sh does)" >&2; exit 1; }
source "$PWD/lib.sh"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${PEER_NAME:-ovtuned}
PORT=${OV_TUNED_PORT:-8001}
precision_var=PEER_PRECISION_$NAME
export PEER_PRECISION=${!precision_var:-${PEER_PRECISION:-f32}}
export PEER_MODEL_DIR=${PEER_MODEL_DIR:-$PEERS_DIR/models/tf_efficientnet_lite0}
export PEER_LABELS=$PEERS_DIR/models/imagenet_labels.json PEER_ONNX_DIR=$RUN_DIR
export PYTHONPATH=$PEERS_DIR/rt/site${PYTHONPATH:+:$PYTHONPATH}
PIDF=$RUN_DIR/$NAME.pids
if [[ -f $PIDF ]]; then echo "$NAME: $PIDF exists; run $here/stop.sh first" >&2; exit 1; fi
setsid "$VENV/bin/uvicorn" --app-dir "$here" server:app --host 127.0.0.1 --port "$PORT" --no-access-log \
  --loop uvloop --http httptools >"$RUN_DIR/$NAME.log" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$PIDF"
wait_http "http://127.0.0.1:$PORT/health" 180 "$PID" || { tail -20 "$RUN_DIR/$NAME.log" >&2; stop_pids "$PIDF"; exit 1; }
descendants "$PID" >"$PIDF"
echo "$NAME up on http://127.0.0.1:$PORT/predict ($(curl -fsS "http://127.0.0.1:$PORT/health")) pids: $(tr '\n' ' ' <"$PIDF")"
