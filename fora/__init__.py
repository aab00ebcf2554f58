"""fora: Fisher-orthogonal Rank Adaptation (FoRA) for decoder LLMs.

The public API is re-exported here. Names resolve lazily (PEP 562) so that
`import fora` stays cheap and a script that needs only the optimizer never
imports the GGUF converter.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # fora.models: the decoder and its loss
    "causal_lm_loss": "fora.models.loss",
    "head_loss": "fora.models.loss",
    "supervised_positions": "fora.models.loss",
    "forward_loss": "fora.training.loop",
    "compile_blocks": "fora.models.speed",
    "checkpoint_blocks": "fora.models.speed",
    "IGNORE_INDEX": "fora.models.loss",
    "decoder_layers": "fora.models.paths",
    "target_modules": "fora.models.paths",
    # fora.formats: checkpoints, tokenizers, GGUF, adapters on disk
    "ModelConfig": "fora.models.config",
    "CausalLM": "fora.models.decoder",
    "load_model": "fora.formats.loading",
    "load_tokenizer": "fora.formats.loading",
    "LoadedTokenizer": "fora.formats.tokenizer",
    "convert_gguf": "fora.formats.gguf",
    "ensure_converted": "fora.formats.gguf",
    "packaged_gguf": "fora.formats.gguf",
    "export_gguf": "fora.formats.gguf_export",
    "export_adapter_gguf": "fora.formats.gguf_writer",
    "export_model_gguf": "fora.formats.gguf_model",
    "PRESETS": "fora.formats.hub",
    "resolve_checkpoint": "fora.formats.hub",
    # the method: LoRA (Eq. 1), Stiefel geometry (Eq. 4-6), Cayley-Adam
    "DEFAULT_TARGETS": "fora.inject",
    "LoRALinear": "fora.lora",
    "inject_lora": "fora.inject",
    "CayleyAdam": "fora.cayley_adam",
    "build_optimizers": "fora.optim",
    "scheduled": "fora.optim",
    "random_stiefel": "fora.stiefel",
    "project_tangent": "fora.stiefel",
    "cayley_step": "fora.stiefel",
    "cayley_fixed_point": "fora.stiefel",
    "qr_retract": "fora.stiefel",
    "stiefel_error": "fora.stiefel",
    "effective_rank": "fora.stiefel",
    "lora_modules": "fora.inject",
    "adapters_disabled": "fora.inject",
    "stiefel_parameters": "fora.inject",
    "euclidean_parameters": "fora.inject",
    "freeze_base": "fora.inject",
    "count_trainable": "fora.inject",
    "adapted_layers": "fora.inject",
    # the method: layer selection (Eq. 2-3) and the seed methods (CKA, FIM-LoRA)
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
    # fora.training: data, batching, the built-in task
    "load_records": "fora.training.data",
    "write_jsonl": "fora.training.data",
    "build_prompt": "fora.training.data",
    "encode_record": "fora.training.data",
    "encode_records": "fora.training.data",
    "split_records": "fora.training.data",
    "make_batches": "fora.training.batching",
    "epoch_batches": "fora.training.batching",
    "calibration_batches": "fora.training.batching",
    "count_tokens": "fora.training.batching",
    "arithmetic_task": "fora.training.tasks",
    "extract_answer": "fora.training.tasks",
    "answer_accuracy": "fora.training.tasks",
    # fora.training: the run, and the adapter format it writes
    "save_adapter": "fora.formats.peft_io",
    "load_adapter": "fora.formats.peft_io",
    "merged_state_dict": "fora.formats.peft_io",
    "save_merged": "fora.formats.peft_io",
    "TrainConfig": "fora.training.config",
    "train": "fora.training.run",
    "TrainingDiverged": "fora.training.loop",
    "METHODS": "fora.training.methods",
    # fora.training: several processes under torchrun
    "init_distributed": "fora.training.distributed",
    "distributed_fisher_scores": "fora.training.distributed",
    # QFoRA's 4-bit base and the DoRA baseline
    "NF4Linear": "fora.models.nf4",
    "quantize_nf4": "fora.models.nf4",
    "dequantize_nf4": "fora.models.nf4",
    "DoRALinear": "fora.dora",
    # the AdaLoRA baseline (Table 1): triplet adapters, the orthogonality term, the rank allocator
    "AdaLoRALinear": "fora.adalora",
    "RankAllocator": "fora.adalora",
    "orthogonal_regularizer": "fora.adalora",
    "save_folded_lora": "fora.formats.peft_io",
    "TrainingInterrupted": "fora.training.interrupt",
    "CAYLEY_BETAS": "fora.cayley_adam",
    "cayley_adam_step": "fora.cayley_adam",
    "CausalLMLoss": "fora.models.decoder",
    # fora.evaluation: accuracy (generate / loglik protocols), perplexity; the decoder's KV cache
    "load_eval_tasks": "fora.evaluation.tasks_io",
    "evaluate_tasks": "fora.evaluation.accuracy",
    "evaluate_generate": "fora.evaluation.accuracy",
    "evaluate_loglik": "fora.evaluation.accuracy",
    "text_perplexity": "fora.evaluation.perplexity",
    "load_evaluated": "fora.evaluation.adapted",
    "fill_in_accuracy": "fora.evaluation.fill_in",
    "KVCache": "fora.models.generation",
    # fora.evaluation: what an adapter did (spectra, effective rank, KL drift) and its figures
    "delta_singular_values": "fora.evaluation.diagnostics",
    "adapter_diagnostics": "fora.evaluation.diagnostics",
    "output_drift": "fora.evaluation.diagnostics",
    "analyze_adapter": "fora.evaluation.diagnostics",
    "plot_fisher_profile": "fora.evaluation.plots",
    "plot_spectra": "fora.evaluation.plots",
    "plot_val_curves": "fora.evaluation.plots",
    "cloze_task": "fora.training.cloze",
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
