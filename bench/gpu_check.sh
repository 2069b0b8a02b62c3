#!/usr/bin/env bash
# The GPU check of a lent card, as one prepared command (under 5 minutes; bench/gpu_check.py says what it measures).
#   bash bench/gpu_check.sh                  # on any machine with a CUDA card and requirements.txt installed
# On this workplace's device machine (its python3 has torch, timm, h5py, scipy, scikit-image, but not the packages
# below), first download their wheels here into .whl/ (ignored by git) and carry it:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     segmentation-models-pytorch==0.6.0 nibabel==5.4.2 connected-components-3d==4.1.1 fastremap==1.21.0 \
#     jsonschema==4.26.0 jsonschema-specifications referencing rpds-py
#   device run: carry [".whl"], command "bash bench/gpu_check.sh", timeout_s 400
# The table is written to $OUT/gpu_check.md (or ./gpu_check.md) and printed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/workflow${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 290 python3 bench/gpu_check.py --out "${OUT:-.}/gpu_check.md" "$@"
