"""fora: Fisher-orthogonal Rank Adaptation (FoRA) for decoder LLMs.

The public API is re-exported here. Names resolve lazily (PEP 562) so that
`import fora` stays cheap and a script that needs only the optimizer never
imports the GGUF converter.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # decoders and loading (issue 2)
    "ModelConfig": "fora.config",
    "CausalLM": "fora.model",
    "load_model": "fora.loading",
    "load_tokenizer": "fora.tokenizer",
    "LoadedTokenizer": "fora.tokenizer",
    "convert_gguf": "fora.gguf",
    "ensure_converted": "fora.gguf",
    "packaged_gguf": "fora.gguf",
    "PRESETS": "fora.hub",
    "resolve_checkpoint": "fora.hub",
    # LoRA, Stiefel geometry, optimizer (issue 3)
    "LoRALinear": "fora.lora",
    "inject_lora": "fora.inject",
    "CayleyAdam": "fora.cayley_adam",
    "build_optimizers": "fora.optim",
    "random_stiefel": "fora.stiefel",
    "project_tangent": "fora.stiefel",
    "cayley_step": "fora.stiefel",
    "cayley_fixed_point": "fora.stiefel",
    "qr_retract": "fora.stiefel",
    "stiefel_error": "fora.stiefel",
    "effective_rank": "fora.stiefel",
    "lora_modules": "fora.inject",
    "stiefel_parameters": "fora.inject",
    "euclidean_parameters": "fora.inject",
    "freeze_base": "fora.inject",
    "count_trainable": "fora.inject",
    "adapted_layers": "fora.inject",
    # layer selection and FIM-LoRA rank allocation (issue 4)
    "fisher_scores": "fora.fisher",
    "cka_scores": "fora.cka",
    "linear_cka": "fora.cka",
    "select_layers": "fora.selection",
    "random_layers": "fora.selection",
    "all_layers": "fora.selection",
    "calibration_fingerprint": "fora.selection",
    "selection_record": "fora.selection",
    "fim_rank_pattern": "fora.fim_lora",
    "allocate_ranks": "fora.fim_lora",
    # data, batching, synthetic task (issue 5)
    "load_records": "fora.data",
    "write_jsonl": "fora.data",
    "build_prompt": "fora.data",
    "encode_record": "fora.data",
    "encode_records": "fora.data",
    "split_records": "fora.data",
    "make_batches": "fora.batching",
    "epoch_batches": "fora.batching",
    "calibration_batches": "fora.batching",
    "count_tokens": "fora.batching",
    "arithmetic_task": "fora.tasks",
    "extract_answer": "fora.tasks",
    "answer_accuracy": "fora.tasks",
    # training (issue 5)
    "save_adapter": "fora.peft_io",
    "load_adapter": "fora.peft_io",
    "merged_state_dict": "fora.peft_io",
    "save_merged": "fora.peft_io",
    "TrainConfig": "fora.train_config",
    "train": "fora.trainer",
    "TrainingDiverged": "fora.train_loop",
    "METHODS": "fora.methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
