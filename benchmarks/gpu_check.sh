#!/usr/bin/env bash
# The GPU check on a machine without network (the lent H200): installs what its Python lacks from wheels carried
# in benchmarks/wheels/ (made here with: pip download --no-deps -d benchmarks/wheels transformers==5.23.0
# tokenizers huggingface_hub safetensors), puts the working tree's package on the path, runs the script.
# Usage: benchmarks/gpu_check.sh OUT_DIR [extra arguments of gpu_check.py]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [args]}; shift
py=${PYTHON:-python3}
if [ -d benchmarks/wheels ] && ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --find-links benchmarks/wheels benchmarks/wheels/*.whl || \
    echo "gpu_check.sh: installing the carried wheels failed; running with the machine's own versions"
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" exec "$py" benchmarks/gpu_check.py --out "$out" "$@"
