"""The decoder (LLaMA / Qwen3 / Gemma-2 / Gemma-3 as config fields) and its loss; uses nothing else of fora."""
