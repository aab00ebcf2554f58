"""Run folders with a trained-looking LoRA adapter, for the GGUF export tests.

`make_run(root, base, variant)` injects LoRA into every projection llama.cpp adapts in two layers
of the checkpoint `base`, draws B at random (a fresh adapter's B = 0 would hide every scale
error), saves the adapter in PEFT's layout as a run does and returns (run folder, model with the
adapter). Variants: "plain" (one rank, one alpha), "rslora" (alpha / sqrt(r)), "fim" (per-module
ranks, as a FIM-LoRA rank pattern writes them) and "dora".
"""
from __future__ import annotations

from pathlib import Path

import torch

from fora.baselines.dora import DoRALinear
from fora.formats.loading import load_model
from fora.formats.peft_io import save_adapter
from fora.inject import inject_lora, lora_modules
from fora.lora import LoRALinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("plain", "rslora", "fim")


def make_run(root: Path, base: Path, variant: str = "plain", layers: tuple[int, ...] = (0, 1)):
    model = load_model(base, dtype=torch.float32, device="cpu")
    pattern = None
    if variant == "fim":
        pattern = {f"model.layers.{layers[-1]}.self_attn.q_proj": 2, f"model.layers.{layers[0]}.mlp.down_proj": 6,
                   f"model.layers.{layers[0]}.self_attn.k_proj": 1}
    inject_lora(model, list(layers), targets=TARGETS, rank=4, alpha=8.0, rslora=variant == "rslora",
                rank_pattern=pattern, seed=0, adapter=DoRALinear if variant == "dora" else LoRALinear,
                stiefel=variant != "dora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            if m.lora_gate is not None:  # FoRA: a trained gate and A; B stays column-orthonormal
                m.lora_gate.fill_(0.5 + float(torch.rand((), generator=g)))
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
            else:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
            if variant == "dora":
                m.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    run = root / f"run-{variant}"
    save_adapter(model, run, base_model_name_or_path=str(base))
    return run, model.eval()
