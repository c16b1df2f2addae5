#!/usr/bin/env bash
# Download the wheels bench/gpu/run.sh installs on a bare CUDA machine (Python 3.12, torch, transformers,
# grpcio and numpy 2 already there; no network) into .whl/ (ignored by git; it travels with the working tree).
#   bash bench/gpu/fetch_wheels.sh            # for the GPU machine (CPython 3.12, x86-64 Linux)
#   PYVER=3.11 DEST=/tmp/whl311 bash bench/gpu/fetch_wheels.sh   # the same set for a local dry run
# Exactly these packages, no dependencies resolved (--no-deps): what the diffusion server, the editor and
# `ns-train in2n` (nerfstudio 1.1.5 and this project's plugin) import beyond the machine's own packages.
# Versions: those of requirements.lock, except fpsample (the lock's 1.0.2 has no wheel on PyPI; 0.3.3 has
# bucket_fps_kdline_sampling, nerfstudio's only use of it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PURE=(
  diffusers==0.42.1 protobuf==3.20.3 grpcio-health-checking==1.48.2 grpcio-reflection==1.48.2
  prometheus_client==0.26.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1
  importlib_metadata==10.2.0 zipp==4.1.2 accelerate==1.15.0
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0
  requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 idna==3.20
  # the trainer (ns-train in2n): nerfstudio and what its start-up imports that the machine lacks
  nerfstudio==1.1.5 gsplat==1.4.0 nerfacc==0.5.2 viser==0.2.7 tensorly==0.10.0 splines==0.3.0 pyquaternion==0.9.9
  pytorch-msssim==1.0.0 appdirs==1.4.4 defusedxml==0.7.1 dill==0.4.1 multiprocess==0.70.19 pathos==0.3.5
  ppft==1.7.8 pox==0.3.7 PySocks==1.7.1
  # tensorboard as locked: its generated protos run on protobuf 3.20.3 (the newest, 2.21, needs protobuf 5+)
  tensorboard==2.20.0
)
BINARY=(pillow==13.0.0 psutil==7.2.2 charset-normalizer==3.5.2 msgspec==0.22.0 rawpy==0.28.0 fpsample==0.3.3 websockets==17.4)
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" -d "$DEST" "${PURE[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "${BINARY[@]}"
du -sh "$DEST"
# The whole working tree travels to the GPU machine (64 MiB at most): report it, wheels included.
total=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -sb "$DEST" | cut -f1)
echo "tracked files $((total / 1024)) KiB + wheels $((wheels / 1024)) KiB = $(((total + wheels) / 1048576)) MiB (limit 64 MiB)"
if [ $((total + wheels)) -gt $((64 * 1048576)) ]; then echo "over the 64 MiB limit" >&2; exit 1; fi
