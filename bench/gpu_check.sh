#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py), from any folder; see BENCHMARKS.md for its last results.
#
#   bash bench/gpu_check.sh fetch          # on a machine with PyPI: wheels of what the GPU image lacks, into .whl/
#   bash bench/gpu_check.sh OUT [OPTIONS]  # on the GPU machine: installs .whl/*.whl (if any) aside, runs the check,
#                                          # writes OUT/report.json and OUT/report.md (OPTIONS go to gpu_check.py)
#
# The project is imported from this checkout (PYTHONPATH), not installed: the GPU image has torch, triton, timm,
# einops, safetensors and tensorboard, but no network for build dependencies, and lacks torchdeq and clean-fid.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(torchdeq==0.1.0 clean-fid==0.1.35)
if [[ "${1:-}" == fetch ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit
fi
OUT=${1:?usage: bash bench/gpu_check.sh OUT [gpu_check.py options], or: bash bench/gpu_check.sh fetch}
shift
SITE=${GET_CHECK_SITE:-/tmp/get-check-site}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
mkdir -p "$SITE"
ln -sfn "$PWD/kernels" "$SITE/get_kernels"  # the import name pyproject.toml gives the kernels/ folder when installed
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py --out "$OUT" "$@"
