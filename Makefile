# in2n-async: edit NeRF scenes with text instructions, trainer and diffusion server in two processes.
#   make run    set up if needed, then run a whole edit of the demo scene (or SCENE=...), results in outputs/
#   make test   set up if needed, check the generated gRPC code, run the tests
# See README.md for every parameter.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config names local mirrors that do not hold every package; pip warns once per package.
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location" || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
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
PORT ?= 50051
# make test parameters
PYTEST_ARGS ?=

.PHONY: setup run serve test test-all protos check-protos lock clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements.lock pyproject.toml
	@echo "== setting up $(VENV) (pinned: requirements.lock) =="
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock $(QUIET_PIP)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . $(QUIET_PIP)
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

test: setup check-protos
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything, slow tests included (real weights where present, long runs).
test-all: setup check-protos
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

run: setup
	$(PY) -m nerf_trainer.run --scene "$(SCENE)" --instruction "$(INSTRUCTION)" --backend $(BACKEND) \
	  --model "$(MODEL)" --steps $(STEPS) --pretrain-steps $(PRETRAIN_STEPS) --train-device $(TRAIN_DEVICE) \
	  --edit-device $(EDIT_DEVICE) --port $(PORT) --method $(METHOD)

# The diffusion server(s) of make run alone, in the foreground: one per EDIT_DEVICE, METHOD's precision.
serve: setup
	$(PY) -m nerf_trainer.run --serve-only --backend $(BACKEND) --model "$(MODEL)" --edit-device $(EDIT_DEVICE) \
	  --port $(PORT) --method $(METHOD)

# Re-pin requirements.lock from the current environment.
lock: setup
	$(VENV)/bin/pip freeze --exclude-editable | { echo "# Exact versions installed by \`make setup\` (pip freeze, Python 3.11, x86_64). Regenerate: make lock."; cat; } > requirements.lock

clean:
	rm -rf $(VENV) $(PROTO_VENV) .pytest_cache .hypothesis
