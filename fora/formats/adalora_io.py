"""AdaLoRA adapters on disk: peft's ADALORA format, and a plain LoRA with the kept triplets folded in.

* ADALORA (what ``peft`` 0.21 ``save_pretrained`` writes for an AdaLoRA model): `adapter_config.json`
  with `peft_type: "ADALORA"`, `init_r`, `target_r`, the schedule, and `rank_pattern`
  {`<path>.lora_E`: [bool] * init_r}; tensors `base_model.model.<path>.lora_A` [k, d_in],
  `.lora_E` [k, 1], `.lora_B` [d_out, k], sliced to the k kept triplets. peft keeps the scale
  α / (init_r + 1e-5) when it loads one. Written whole (no slicing, `rank_pattern: null`) when no
  schedule is given: the training checkpoint's form, which `--resume` reads back bit for bit.
* Folded LoRA, for serving stacks that know only LoRA: A' = (E ⊙ A)[kept], B' = B[:, kept],
  integer `rank_pattern` (k per module) and `alpha_pattern` α_m = s · k so that α_m / k = s exactly;
  modules with no kept triplet are left out (`exclude_modules`).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fora.baselines.adalora import AdaLoRALinear

PEFT_PREFIX = "base_model.model."
# AdaLoraConfig's schedule fields (peft names) and the values a checkpoint without a schedule records.
SCHEDULE_KEYS = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def adalora_modules(model: nn.Module) -> dict[str, AdaLoRALinear]:
    """{full module path: AdaLoRALinear} (empty for other adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)}


def adalora_tensors(modules: Mapping[str, AdaLoRALinear], *, prune: bool) -> dict[str, torch.Tensor]:
    """peft's ADALORA tensor names -> A, E, B; ``prune`` slices them to each module's kept triplets."""
    out = {}
    for path, m in modules.items():
        keep = m.kept.to(m.lora_A.device) if prune else slice(None)
        out[f"{PEFT_PREFIX}{path}.lora_A"] = m.lora_A.detach()[keep]
        out[f"{PEFT_PREFIX}{path}.lora_E"] = m.lora_E.detach()[keep]
        out[f"{PEFT_PREFIX}{path}.lora_B"] = m.lora_B.detach()[:, keep]
    return out


def adalora_config(lora_config: dict[str, Any], modules: Mapping[str, AdaLoRALinear],
                   schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ADALORA `adapter_config.json` from the LoRA one ``peft_io.adapter_config`` built for the same modules."""
    init = {m.ranknum for m in modules.values()}
    if len(init) > 1:
        raise ValueError(f"AdaLoRA modules of several init ranks {sorted(init)} cannot share one "
                         "adapter_config.json; inject every module with the same init_r")
    init_r = init.pop()
    missing = sorted(set(SCHEDULE_KEYS) - set(schedule or SCHEDULE_KEYS))
    if missing:
        raise ValueError(f"AdaLoRA schedule lacks {missing}; pass every peft AdaLoraConfig field of {SCHEDULE_KEYS}")
    config = {k: v for k, v in lora_config.items() if k not in ("r", "rank_pattern", "alpha_pattern", "use_dora")}
    config.update(peft_type="ADALORA", init_r=init_r, alpha_pattern={})
    # peft needs a valid schedule even for inference; a checkpoint's real one is in train_config.json
    config.update(schedule or {"target_r": init_r, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85,
                               "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 1})
    config["rank_pattern"] = ({f"{p}.lora_E": m.kept.tolist() for p, m in sorted(modules.items())}
                              if schedule is not None else None)
    return config


def load_adalora(model: nn.Module, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Inject AdaLoRALinear modules with the saved (possibly sliced) A, E, B; returns the paths read.

    The scale keeps peft's divisor init_r + 1e-5 however many triplets were kept; α is `lora_alpha`
    (peft's AdaLoraModel reads no alpha_pattern).
    """
    suffix = ".lora_A"
    paths = sorted(k[len(PEFT_PREFIX):-len(suffix)] for k in tensors
                   if k.startswith(PEFT_PREFIX) and k.endswith(suffix))
    if not paths:
        raise ValueError(f"the ADALORA adapter holds no `{PEFT_PREFIX}*.lora_A` tensors; was it saved by peft or fora?")
    named = dict(model.named_modules())
    for path in paths:
        base = named.get(path)
        A, E, B = (tensors.get(f"{PEFT_PREFIX}{path}.{part}") for part in ("lora_A", "lora_E", "lora_B"))
        if not isinstance(base, nn.Linear) or E is None or B is None or A.shape[1] != base.in_features \
                or B.shape != (base.out_features, A.shape[0]) or E.shape != (A.shape[0], 1):
            raise ValueError(f"ADALORA tensors for {path!r} do not fit this model's "
                             f"{type(base).__name__ if base is not None else 'missing'} layer (A "
                             f"{tuple(A.shape)}); load the adapter into the base it was trained on")
        if A.shape[0] == 0:  # every triplet pruned: the layer stays the base layer
            continue
        m = AdaLoRALinear(base, int(A.shape[0]), float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout", 0.0)),
                          ranknum=int(config["init_r"]))
        with torch.no_grad():
            for p, v in ((m.lora_A, A), (m.lora_E, E), (m.lora_B, B)):
                p.copy_(v)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m)
    return paths


def folded_lora(modules: Mapping[str, AdaLoRALinear], lora_config: dict[str, Any]
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and `adapter_config.json` of the plain LoRA twin (see the module docstring).

    ``lora_config`` is what ``peft_io.adapter_config`` built for the same modules.
    """
    if not modules:
        raise ValueError("the model has no AdaLoRA modules to fold; train with --method adalora")
    kept = {p: int(m.kept.sum()) for p, m in modules.items()}
    live = {p: m for p, m in modules.items() if kept[p] > 0}
    if not live:
        raise ValueError("every AdaLoRA triplet was pruned: there is no LoRA update to export")
    tensors, alphas = {}, {}
    for path, m in live.items():
        keep = m.kept.to(m.lora_A.device)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (m.lora_A * m.lora_E).detach()[keep].contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.detach()[:, keep].contiguous()
        alphas[path] = m.scale * kept[path]  # α_m / k_m = s exactly (the LoRA scale of this module)
    r, alpha = _most_common([kept[p] for p in live]), _most_common(list(alphas.values()))
    pruned = sorted(set(modules) - set(live))
    config = {**lora_config, "r": r, "lora_alpha": alpha,
              "rank_pattern": {p: kept[p] for p in sorted(live) if kept[p] != r},
              "alpha_pattern": {p: a for p, a in sorted(alphas.items()) if a != alpha},
              "exclude_modules": sorted((lora_config["exclude_modules"] or []) + pruned) or None}
    return tensors, config


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)  # ties to the largest, as peft_io's rank patterns
    return max(counts, key=lambda v: (counts[v], v))
