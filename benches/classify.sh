#!/usr/bin/env bash
# `visionserve classify` on a folder of IMAGES copies of one photo, interleaved with the server
# under closed-loop load (benches/http.rs, CLIENTS clients) on the same photo, ROUNDS times each,
# so the host's drift hits both alike. Prints every round and the medians (images/s).
#   benches/classify.sh BIN MODEL_DIR PHOTO [IMAGES] [ROUNDS] [CLIENTS]
set -euo pipefail
bin=$1 model=$2 photo=$3 images=${4:-300} rounds=${5:-3} clients=${6:-32}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for i in $(seq -w 1 "$images"); do cp "$photo" "$dir/img-$i.jpg"; done
# The server bench runs for about as long as one classify run.
seconds=$(( images / 40 > 5 ? images / 40 : 5 ))
classify_rates=() server_rates=()
for round in $(seq 1 "$rounds"); do
  summary=$("$bin" classify --device cpu --model "$model" --top-k 5 "$dir" 2>&1 >/dev/null | tail -1)
  rate=$(sed -n 's/.*(\([0-9.]*\) images\/s).*/\1/p' <<<"$summary")
  classify_rates+=("$rate")
  echo "round $round classify: $summary"
  line=$(cargo bench -q --bench http -- --image "$photo" --concurrency "$clients" --seconds "$seconds" \
           --server --model "lite0=$model" --device cpu 2>/dev/null | awk -F'|' -v c="$clients" '$3 + 0 == c' | tail -1)
  server_rates+=("$(awk -F'|' '{gsub(/ /, "", $6); print $6}' <<<"$line")")
  echo "round $round server ($clients clients): $line"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "median images/s over $rounds rounds: classify $(median "${classify_rates[@]}"), server at $clients clients $(median "${server_rates[@]}")"
