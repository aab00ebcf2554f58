"""What comes from or goes to disk: safetensors checkpoints, the hub, GGUF, tokenizers, PEFT adapters,
atomic writes."""
