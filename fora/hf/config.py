"""Fisher layer choice as a peft ``LoraConfig`` (Eq. 2-3), checked against the model before training.

peft adapts a module when its name ends with a target name (``q_proj``) and, with
``layers_to_transform``, when its index after ``layers_pattern`` is listed. So the top-K layers go
into ``layers_to_transform`` with ``layers_pattern="layers"`` and the targets stay plain names: that
matches ``model.layers.<i>.self_attn.q_proj`` in LLaMA, Qwen3 and Gemma-3 alike, and the choice is
written into the saved ``adapter_config.json``. A config that would adapt nothing, or fewer modules
than K × len(targets), raises naming the linear modules the selected layers do have.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn

from fora.fisher import fisher_scores
from fora.inject import DEFAULT_TARGETS
from fora.models.paths import decoder_layers, layer_index
from fora.selection import select_layers

log = logging.getLogger(__name__)

FISHER_BATCHES = 128  # N of Eq. 2, the paper's and the authors' default
_OWNED = ("target_modules", "layers_to_transform", "layers_pattern")


def matched_modules(model: nn.Module, config: Any) -> list[str]:
    """Names of the modules of ``model`` that peft's own matcher adapts under ``config``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name) is True]


def check_targets(model: nn.Module, config: Any, layers: Sequence[int], targets: Sequence[str]) -> list[str]:
    """The matched module names; raises unless they are exactly K × len(targets) linear layers."""
    matched = matched_modules(model, config)
    linear = [n for n in matched if isinstance(model.get_submodule(n), nn.Linear)]
    want = len(layers) * len(targets)
    if len(linear) == want and len(matched) == want:
        return matched
    found = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and layer_index(name) in set(layers)})
    got = {n.rsplit(".", 1)[-1] for n in linear}
    missing = [t for t in targets if t not in got]
    raise ValueError(f"target_modules {list(targets)} match {len(linear)} linear modules in layers {list(layers)} "
                     f"of this {type(model).__name__}, not {want} ({len(layers)} layers × {len(targets)} targets); "
                     f"no match for {missing or 'some of them'}. Linear modules in those layers: "
                     f"{', '.join(found) or 'none'}; pass targets from that list")


def fisher_lora_config(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], k: int, *,
                       targets: Sequence[str] = DEFAULT_TARGETS, num_batches: int = FISHER_BATCHES,
                       **lora_kwargs: Any) -> Any:
    """A ``peft.LoraConfig`` on the K layers of highest Fisher score (Eq. 2-3) of a transformers model.

    Args:
        model: the base causal LM (blocks at ``model.model.layers``), before ``get_peft_model``.
        batches: calibration batches, dicts with ``input_ids``, ``labels`` (-100 = no loss) and
            optionally ``attention_mask``; the first ``num_batches`` are used.
        k: how many layers get adapters.
        targets: projection names adapted in each selected layer.
        lora_kwargs: any other ``LoraConfig`` field (``r``, ``lora_alpha``, ``lora_dropout``, ...);
            ``task_type`` defaults to ``"CAUSAL_LM"``.
    Returns:
        ``LoraConfig(target_modules=targets, layers_to_transform=<top-K, ascending>, layers_pattern="layers")``.
    Raises:
        ValueError when ``model`` already carries peft adapters, ``lora_kwargs`` sets a field this
        function owns, or the targets match fewer modules than K × len(targets) (the message lists
        the linear modules found).
    """
    import peft

    if isinstance(model, peft.PeftModel) or any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules()):
        raise ValueError("the model already carries peft adapters; score the base model: call "
                         "fisher_lora_config before peft.get_peft_model")
    owned = [key for key in _OWNED if key in lora_kwargs]
    if owned:
        raise ValueError(f"fisher_lora_config sets {owned} itself (targets=..., the Fisher top-K); "
                         "remove them from the keyword arguments")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of module names such as ['q_proj', 'v_proj'], got {targets!r}")
    every = list(range(len(decoder_layers(model))))  # first k and the targets, on every layer: before scoring
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(every):
        raise ValueError(f"k={k!r} is out of range for a model with {len(every)} layers; choose k in [1, {len(every)}]")
    check_targets(model, _lora_config(peft, lora_kwargs, targets, every), every, targets)
    calibration = list(islice(batches, num_batches))
    scores = fisher_scores(model, calibration)
    layers = select_layers(scores, k)
    log.info("Fisher scores %s; selected layers %s", [round(float(s), 6) for s in scores], layers)
    config = _lora_config(peft, lora_kwargs, targets, layers)
    check_targets(model, config, layers, targets)
    return config


def _lora_config(peft: Any, lora_kwargs: Mapping[str, Any], targets: Sequence[str], layers: list[int]) -> Any:
    return peft.LoraConfig(**{"task_type": "CAUSAL_LM", **lora_kwargs}, target_modules=list(targets),
                           layers_to_transform=layers, layers_pattern="layers")
