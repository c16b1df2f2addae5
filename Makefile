# in2n-async: edit NeRF scenes with text instructions, trainer and diffusion server in two processes.
#   make run    set up if needed, then run a whole edit of the demo scene (or SCENE=...), results in outputs/
#   make test   set up if needed, check the generated gRPC code, run the tests
#   make serve-ray  the diffusion server as a Ray Serve application (README: "Many machines: Ray Serve")
# See README.md for every parameter.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config names local mirrors that do not hold every package; pip warns once per package.
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location" || true; }
PYTHON ?= python3
# Two environments: the trainer's (nerfstudio, protobuf 3.20.3, numpy 1; installed by pip) and the server's
# (no nerfstudio; Ray Serve, a current protobuf, numpy 2; installed and locked by uv). README: "Installation".
VENV ?= .venv
PY := $(VENV)/bin/python
SERVER_VENV ?= .venv-server
SERVER_PY := $(SERVER_VENV)/bin/python
UV_VENV ?= .venv-uv
UV_VERSION := 0.13.8
UV := $(UV_VENV)/bin/uv
# uv reads no pip configuration: hand it the find-links and extra indexes pip is configured with (local mirrors
# on some machines), so that both find the same files; unsafe-best-match picks versions across indexes as pip does.
UV_INDEX = $(foreach x,$(sort $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null) $(PIP_FIND_LINKS)),--find-links $(x)) \
  $(foreach x,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null) $(PIP_EXTRA_INDEX_URL),--extra-index-url $(x)) \
  --index-strategy unsafe-best-match
PROTO_VENV ?= .venv-protos
PROTO := protos/in2n/v1/edit_service.proto

# make run parameters (README: "make run parameters")
METHOD ?= in2n-tiny
SCENE ?=
INSTRUCTION ?=
BACKEND ?= auto
MODEL ?= timbrooks/instruct-pix2pix
STEPS ?= 300
PRETRAIN_STEPS ?= 1000
TRAIN_DEVICE ?= cpu
EDIT_DEVICE ?= cpu
# Where the views to edit are rendered: auto (render workers when an edit device is not TRAIN_DEVICE), trainer, workers.
RENDER ?= auto
PORT ?= 50051
# More ns-train arguments for the edit run, appended last, e.g. TRAIN_ARGS="--pipeline.guidance-scale 9".
TRAIN_ARGS ?=
VIDEO_FRAMES ?= 60
# Captions for the CLIP direction similarity at the end of make run (both or neither; CLIP_MODEL from the HF cache).
CAPTION_ORIGINAL ?=
CAPTION_EDITED ?=
CLIP_MODEL ?= openai/clip-vit-large-patch14
# make serve-ray parameters
REPLICAS ?= 1
GPUS_PER_REPLICA ?= 0
MAX_REPLICAS ?= 0
RAY_ADDRESS ?=
# make test parameters
PYTEST_ARGS ?=

.PHONY: setup setup-trainer setup-server run serve serve-ray test test-all lint format protos check-protos lock lock-server clean

setup: setup-trainer setup-server
setup-trainer: $(VENV)/.setup-done
setup-server: $(SERVER_VENV)/.setup-done

$(UV_VENV)/.setup-done:
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION) $(QUIET_PIP)
	touch $@

# pip, not uv: where a release's files are spread over several indexes (local mirrors holding some of them),
# uv takes them from the first index that has the release and may install the wrong wheel (multiprocess's py310
# build on Python 3.11, which breaks nerfstudio's data loader); pip weighs them all.
$(VENV)/.setup-done: requirements.lock pyproject.toml
	@echo "== setting up $(VENV), the trainer's environment (pinned: requirements.lock) =="
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock $(QUIET_PIP)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . $(QUIET_PIP)
	touch $@

$(SERVER_VENV)/.setup-done: requirements-server.lock pyproject.toml $(UV_VENV)/.setup-done
	@echo "== setting up $(SERVER_VENV), the server's environment (pinned: requirements-server.lock) =="
	$(UV) venv -q --allow-existing --python $(PYTHON) $(SERVER_VENV)
	$(UV) pip sync -q --python $(SERVER_PY) $(UV_INDEX) requirements-server.lock
	$(UV) pip install -q --python $(SERVER_PY) --no-deps -e .
	touch $@

$(PROTO_VENV)/.setup-done: requirements-protos.lock
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-protos.lock $(QUIET_PIP)
	touch $@

# Regenerate the committed gRPC/protobuf code from the .proto.
protos: $(PROTO_VENV)/.setup-done
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO)

# Fail when the committed generated code is out of date with the .proto.
check-protos: $(PROTO_VENV)/.setup-done
	@tmp=$$(mktemp -d) && \
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I . --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp $(PROTO) && \
	for f in edit_service_pb2.py edit_service_pb2_grpc.py edit_service_pb2.pyi; do \
	  diff -q $$tmp/protos/in2n/v1/$$f protos/in2n/v1/$$f >/dev/null || { echo "protos/in2n/v1/$$f is out of date with $(PROTO): run 'make protos'"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated gRPC code is up to date"

# The formatter and linter (ruff, configured in pyproject.toml): `make format` rewrites, `make lint` checks.
lint: setup-trainer
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-trainer
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup check-protos lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything, slow tests included (real weights where present, long runs).
test-all: setup check-protos lint
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

run: setup-trainer
	$(PY) -m in2n_demo.run --scene "$(SCENE)" --instruction "$(INSTRUCTION)" --backend $(BACKEND) \
	  --model "$(MODEL)" --steps $(STEPS) --pretrain-steps $(PRETRAIN_STEPS) --train-device $(TRAIN_DEVICE) \
	  --edit-device $(EDIT_DEVICE) --port $(PORT) --method $(METHOD) --video-frames $(VIDEO_FRAMES) --render $(RENDER) \
	  --caption-original "$(CAPTION_ORIGINAL)" --caption-edited "$(CAPTION_EDITED)" --clip-model "$(CLIP_MODEL)" \
	  --train-args="$(TRAIN_ARGS)"

# The diffusion server(s) of make run alone, in the foreground: one per EDIT_DEVICE, METHOD's precision.
serve: setup-trainer
	$(PY) -m in2n_demo.run --serve-only --backend $(BACKEND) --model "$(MODEL)" --edit-device $(EDIT_DEVICE) \
	  --port $(PORT) --method $(METHOD)

# The server as a Ray Serve application: starts a local Ray instance, or joins RAY_ADDRESS (a cluster's head).
serve-ray: setup-server
	$(SERVER_PY) -m diffusion_server.ray_serve --backend $(if $(filter auto,$(BACKEND)),palette,$(BACKEND)) --model "$(MODEL)" \
	  --device $(if $(filter-out 0,$(GPUS_PER_REPLICA)),cuda,$(EDIT_DEVICE)) --port $(PORT) --replicas $(REPLICAS) \
	  --gpus-per-replica $(GPUS_PER_REPLICA) --max-replicas $(MAX_REPLICAS) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

# Re-pin requirements.lock from the current environment.
lock: setup-trainer
	$(VENV)/bin/pip freeze --exclude-editable | { echo "# Exact versions installed by \`make setup\` (pip freeze, Python 3.11, x86_64). Regenerate: make lock."; cat; } > requirements.lock

# Re-pin requirements-server.lock: the server, ray and test extras resolved by uv afresh (current index data, no
# preference for the old lock: the same indexes give the same lock), every package the trainer's environment also
# has kept at the trainer's version, except protobuf, numpy and the grpcio helpers (current ones here).
lock-server: $(UV_VENV)/.setup-done
	mkdir -p build && grep -vE '^(protobuf|numpy|grpcio-health-checking|grpcio-reflection)==' requirements.lock > build/trainer-pins.txt
	$(UV) pip compile -q pyproject.toml --extra server --extra ray --extra test --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -c build/trainer-pins.txt $(UV_INDEX) \
	  --refresh --custom-compile-command "make lock-server" -o build/requirements-server.lock
	mv build/requirements-server.lock requirements-server.lock

clean:
	rm -rf $(VENV) $(SERVER_VENV) $(UV_VENV) $(PROTO_VENV) .pytest_cache .hypothesis
