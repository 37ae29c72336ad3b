#!/usr/bin/env bash
# Stop the tuned OpenVINO peer started by start.sh (only the PIDs it recorded); run from the kit's folder.
set -euo pipefail
[[ -f $PWD/lib.sh ]] || { echo "run from the peer kit's folder (as its run_all.sh does)" >&2; exit 1; }
source "$PWD/lib.sh"
stop_pids "$RUN_DIR/${PEER_NAME:-ovtuned}.pids"
