#!/usr/bin/env bash
# Download, into .whl/ at the repository root, the wheels that benchmarks/gpu.py needs on a GPU machine that has
# PyTorch, timm, einops, numpy, scipy, scikit-learn, PyYAML and safetensors but no network: MONAI (the reference
# model and sslkit's Swin-UNETR encoder) and lightly (imported by sslkit's objectives). Both are pure-Python
# wheels, fetched without their dependencies (the machine has them; lightly's hydra-core is not imported).
# sslkit itself travels as the working tree (benchmarks/gpu.py puts the repository root on sys.path).
#
#   bash benchmarks/gpu_wheels.sh                 # versions of the local environment, else the pins below
#   MONAI_VERSION=1.5.1 bash benchmarks/gpu_wheels.sh
#
# On the GPU machine, with .whl/ carried beside the working tree (about 2 MB):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 benchmarks/gpu.py                     # prints the table; $OUT/gpu_benchmark.json when OUT is set
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

installed() {  # the version of a package in the local environment, or the fallback
  "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
}
MONAI_VERSION=${MONAI_VERSION:-$(installed monai 1.6.1)}
LIGHTLY_VERSION=${LIGHTLY_VERSION:-$(installed lightly 1.6.0)}

mkdir -p .whl
rm -f .whl/monai-*.whl .whl/lightly-*.whl  # one version of each: two stop the whole install there
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  "monai==${MONAI_VERSION}" "lightly==${LIGHTLY_VERSION}"

echo
ls -l .whl
cat <<EOF

Carry .whl/ (git-ignored) with the working tree to the GPU machine, then run there:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  python3 benchmarks/gpu.py
EOF
