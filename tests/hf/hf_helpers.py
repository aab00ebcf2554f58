"""Tiny FoRA peft models and Trainer runs for the fora.hf tests (CPU, fp32, seconds each)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen3", "gemma3")
TEXTS = ["The sky is blue.", "Two plus two is four.", "Water boils at 100 C.", "The sun rises in the east.",
         "Cats chase mice.", "Snow is cold.", "Fire is hot.", "Grass is green."]


def base_model(folder: Path) -> Any:
    """The checkpoint as a transformers model (eager attention: Gemma-3's advice for training)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def examples(n: int = 8, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n equal-length records of random token ids (no padding: batch shapes cannot change a loss)."""
    ids = torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def calibration(n_batches: int = 2, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    rows = examples(n_batches * batch_size, seed=1)
    return [{key: torch.stack([r[key] for r in rows[i:i + batch_size]]) for key in rows[0]}
            for i in range(0, len(rows), batch_size)]


def fora_model(folder: Path, k: int | None = None, *, seed: int = 0, **lora: Any) -> Any:
    """Fisher top-K (default L // 2) LoRA config on the checkpoint, FoRA's adapters in it."""
    import fora.hf

    model = base_model(folder)
    k = k or max(1, model.config.num_hidden_layers // 2)
    config = fora.hf.fisher_lora_config(model, calibration(), k, **{"r": 4, "lora_alpha": 8, **lora})
    return fora.hf.get_fora_model(model, config, seed=seed)


def training_args(out: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(**{"output_dir": str(out), "report_to": "none", "use_cpu": True, "disable_tqdm": True,
                                "save_strategy": "no", "logging_strategy": "no", "seed": 0, "max_steps": 3,
                                "per_device_train_batch_size": 4, "lr_scheduler_type": "constant", **overrides})


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name, raw (A and g unfolded), cloned."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
