"""Adapters in PEFT's on-disk format, and merged exports.

A FoRA adapter is an ordinary LoRA adapter restricted to the selected layers (the paper §3,
"Merging for serving"), so it is written exactly as `peft` 0.21 writes one:

* `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `target_modules` (short names),
  `layers_to_transform` (the selected layers) with `layers_pattern: "layers"`, and
  `rank_pattern` / `alpha_pattern` (full module paths) for modules that differ from `r` / `lora_alpha`.
* `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` ([r, d_in]) and
  `.lora_B.weight` ([d_out, r]).

`peft.PeftModel.from_pretrained(hf_model, dir)` and `load_adapter(our_model, dir)` then compute
the same function. Note that the Stiefel constraint on `A` is a training-time property: the saved
adapter is plain LoRA, and serving stacks need nothing new.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora.formats.adalora_io import adalora_config, adalora_modules, adalora_tensors, folded_lora, load_adalora
from fora.formats.atomic import atomic_save_safetensors, atomic_write_json, staging_dir
from fora.baselines.dora import DoRALinear
from fora.inject import lora_modules
from fora.lora import LoRALinear
from fora.quant.nf4 import NF4Linear, dequantized_weights
from fora.models.paths import layer_index

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Files copied next to a merged model so that it loads on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")



def _layer_index(path: str) -> int:
    index = layer_index(path)
    if index is None:
        raise ValueError(f"LoRA module {path!r} is not inside `model.layers.<i>`; PEFT's "
                         "layers_to_transform cannot describe it. Adapt only decoder-layer projections.")
    return index


def _mode(values: list[Any]) -> Any:
    # Most common value; ties go to the largest, so a rank pattern lists the smaller exceptions.
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _dropout_p(module: nn.Module) -> float:
    drop = getattr(module, "lora_dropout", None)
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


def adapter_config(model: nn.Module, *, base_model_name_or_path: str, r: int | None = None) -> dict[str, Any]:
    """The `adapter_config.json` dict describing the LoRA modules currently in `model`.

    `r` is the default rank written as `r` (modules of another rank go to `rank_pattern`); by
    default the most common rank. A FIM-LoRA run passes its budget rank here.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules to save; call fora.inject.inject_lora "
                         "(or load_adapter) first")
    ranks = {p: int(m.rank) for p, m in modules.items()}
    alphas = {p: float(m.alpha) for p, m in modules.items()}
    rslora = {bool(m.rslora) for m in modules.values()}
    dropout = {_dropout_p(m) for m in modules.values()}
    dora = {isinstance(m, DoRALinear) for m in modules.values()}
    if len(rslora) > 1 or len(dropout) > 1 or len(dora) > 1:
        raise ValueError("LoRA modules mix rsLoRA / dropout / DoRA settings, which one adapter_config.json "
                         "cannot express; inject all modules with the same rslora, dropout and dora")
    r = _mode(list(ranks.values())) if r is None else int(r)
    alpha = _mode(list(alphas.values()))
    layers = sorted({_layer_index(p) for p in modules})
    targets = sorted({p.rsplit(".", 1)[-1] for p in modules})
    # peft adapts every target in every listed layer; exclude the combinations we did not adapt.
    existing = {name for name, _ in model.named_modules()}
    missing = sorted(
        p for p in existing
        if p.rsplit(".", 1)[-1] in targets and layer_index(p) is not None
        and _layer_index(p) in layers and p not in modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha if not float(alpha).is_integer() else int(alpha),
        "target_modules": targets,
        "exclude_modules": missing or None,
        "layers_to_transform": layers,
        "layers_pattern": "layers",
        "rank_pattern": {p: k for p, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {p: a for p, a in sorted(alphas.items()) if a != alpha},
        "use_rslora": rslora.pop(),
        "lora_dropout": dropout.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": dora.pop(),
        "lora_bias": False,
    }


def adapter_tensors(model: nn.Module, *, fold_gate: bool = True) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors: `base_model.model.<path>.lora_A.weight` [r, d_in] and `.lora_B.weight` [d_out, r].

    FoRA's gate g is folded into A (the file's A is g · A), so B keeps its orthonormal columns
    and any LoRA loader computes g · s · B A with the file's ``lora_alpha``. ``fold_gate=False``
    (checkpoints) keeps A as trained and writes g as `<path>.lora_gate` (a 0-d tensor), which
    only fora reads back.
    """
    out: dict[str, torch.Tensor] = adalora_tensors(adalora_modules(model), prune=False)  # peft's ADALORA names
    for path, m in lora_modules(model).items():
        if f"{PEFT_PREFIX}{path}.lora_E" in out:
            continue
        A = m.lora_A.detach()
        if m.lora_gate is not None:
            if fold_gate:
                A = m.lora_gate.detach().to(A.dtype) * A
            else:
                out[f"{PEFT_PREFIX}{path}.lora_gate"] = m.lora_gate.detach()
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.detach()
        if isinstance(m, DoRALinear):  # peft's name for DoRA's magnitude m (d_out,)
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 r: int | None = None, extra_files: Mapping[str, Any] | None = None,
                 adalora_schedule: Mapping[str, Any] | None = None, fold_gate: bool = True) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT 0.21 layout) into `out_dir`.

    Both files are written atomically; `extra_files` maps file names to JSON-serialisable objects
    written alongside (e.g. `selection.json`); `r` as in `adapter_config`. Returns `out_dir`.
    AdaLoRA modules are written in peft's ADALORA format (`fora.formats.adalora_io`): sliced to the
    kept triplets with the run's `adalora_schedule` (peft's AdaLoraConfig fields), whole without.
    FoRA's gates are folded into A unless ``fold_gate=False`` (checkpoints; see `adapter_tensors`).
    """
    out_dir = Path(out_dir)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path, r=r)
    ada = adalora_modules(model)
    if ada:
        config = adalora_config(config, ada, adalora_schedule)
    tensors = adalora_tensors(ada, prune=adalora_schedule is not None) if ada else adapter_tensors(model, fold_gate=fold_gate)
    atomic_save_safetensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(out_dir / ADAPTER_CONFIG, config)
    for name, obj in (extra_files or {}).items():
        atomic_write_json(out_dir / name, obj)
    return out_dir


def save_folded_lora(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str) -> Path:
    """A plain LoRA adapter equal in output to the model's AdaLoRA modules (`adalora_io.folded_lora`)."""
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    tensors, config = folded_lora(adalora_modules(model), config)
    atomic_save_safetensors(tensors, Path(out_dir) / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(Path(out_dir) / ADAPTER_CONFIG, config)
    return Path(out_dir)


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    # Same rule as peft.utils.other.get_pattern_key: the key matches a suffix of the module path.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Inject `LoRALinear` modules with the saved ranks at the saved paths and load `A`, `B`.

    Works for any fora `CausalLM` (and any model whose module paths match the adapter's).
    Returns `model` (modified in place).
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; point load_adapter at a folder written by "
                                    "fora.formats.peft_io.save_adapter or peft's save_pretrained")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") == "ADALORA":
        paths = load_adalora(model, config, load_file(weights_path))
        log.info("loaded %d AdaLoRA modules from %s", len(paths), adapter_dir)
        return model
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path} has peft_type={config.get('peft_type')!r}; only LoRA "
                         "adapters (peft_type 'LORA' or 'ADALORA') can be loaded")
    tensors = load_file(weights_path)
    paths = sorted({k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors
                    if k.startswith(PEFT_PREFIX) and k.endswith(".lora_A.weight")})
    if not paths:
        raise ValueError(f"{weights_path} holds no `{PEFT_PREFIX}*.lora_A.weight` tensors; "
                         "is it a LoRA adapter saved by peft or fora?")
    named = dict(model.named_modules())
    for path in paths:
        base = named.get(path)
        if not isinstance(base, (nn.Linear, NF4Linear)) or isinstance(base, LoRALinear):
            what = "missing" if base is None else type(base).__name__
            raise ValueError(f"adapter module {path!r} is {what} in this model (need a plain "
                             "nn.Linear); the adapter was trained for another architecture, or "
                             "the model already carries an adapter")
        A = tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"]
        B = tensors.get(f"{PEFT_PREFIX}{path}.lora_B.weight")
        if B is None or B.shape != (base.out_features, A.shape[0]) or A.shape[1] != base.in_features:
            raise ValueError(f"adapter tensors for {path!r} have shapes A {tuple(A.shape)}, B "
                             f"{None if B is None else tuple(B.shape)}, which do not fit the "
                             f"[{base.out_features} x {base.in_features}] layer of this model")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"]))
        cls = DoRALinear if config.get("use_dora") else LoRALinear
        lora = cls(base, int(A.shape[0]), alpha, dropout=float(config.get("lora_dropout", 0.0)),
                   rslora=bool(config.get("use_rslora", False)))
        gate = tensors.get(f"{PEFT_PREFIX}{path}.lora_gate")  # a fora checkpoint's unfolded gate
        with torch.no_grad():
            lora.lora_A.copy_(A if gate is None else gate.to(A.dtype) * A)
            lora.lora_B.copy_(B)
            if isinstance(lora, DoRALinear):
                m = tensors.get(f"{PEFT_PREFIX}{path}.lora_magnitude_vector")
                if m is None or m.shape != (base.out_features,):
                    raise ValueError(f"{weights_path} is a DoRA adapter (use_dora=true) but its "
                                     f"lora_magnitude_vector for {path!r} is "
                                     f"{'missing' if m is None else f'of shape {tuple(m.shape)}'}; "
                                     "re-export the adapter")
                lora.lora_magnitude_vector.copy_(m)
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lora)
    log.info("loaded %d LoRA modules from %s", len(paths), adapter_dir)
    return model


def merge_lora_state(state: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Pure function over a state dict: `W <- W0 + s * B A` for every module path in `scales`.

    Implements the paper's serving merge (§3) (Eq. 1 folded into W0). `state` holds
    `<path>.weight`, `<path>.lora_A` [r, d_in], `<path>.lora_B` [d_out, r]; the product is taken
    in float32 and cast back to W0's dtype. Every `lora_*` key is dropped from the result.
    """
    out = {k: v for k, v in state.items() if not k.rsplit(".", 1)[-1].startswith("lora_")}
    for path, s in scales.items():
        w0 = state[f"{path}.weight"]
        delta = state[f"{path}.lora_B"].float() @ state[f"{path}.lora_A"].float()
        out[f"{path}.weight"] = (w0.float() + s * delta.to(w0.device)).to(w0.dtype)
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with every LoRA update folded in, under the checkpoint's own names.

    The model is not modified. The tied `lm_head.weight` is omitted (as in the checkpoint).
    """
    modules = lora_modules(model)
    if adalora_modules(model):
        raise ValueError("merged_state_dict folds B A, not AdaLoRA's B (A * E); use fora.formats.peft_io.save_merged")
    special = [p for p, m in modules.items() if isinstance(m, DoRALinear) or m.quantized]
    if special:
        raise ValueError(f"merged_state_dict handles plain LoRA on a full-precision base; {special[0]} is "
                         "DoRA or sits on a 4-bit base: use fora.formats.peft_io.save_merged")
    # An already merged module carries the update in its weight.
    scales = {p: float(m.scale) * m.gate() for p, m in modules.items() if not getattr(m, "merged", False)}
    state = merge_lora_state(model.state_dict(), scales)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_merged(model: nn.Module, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike) -> Path:
    """Write the merged model as `out_dir/{config.json, model.safetensors}` + tokenizer files.

    The tensors are the base checkpoint's own (`source_dir`, from `fora.formats.hub.resolve_checkpoint`):
    same names (a multimodal Gemma-3 keeps its prefixes and vision tower, a tied `lm_head` stays
    omitted), same dtypes, with `W0 + s B A` at every adapted module, computed in float32 from
    the *stored* W0 and cast back (for a model loaded with `quantize="nf4"`, W0 is the dequantized
    4-bit weight of every quantized layer, the weights the run trained against). So the export does not depend on the dtype the run trained in,
    and equals the PEFT adapter applied to that checkpoint. `config.json` and the tokenizer files
    are copied unchanged; the result loads with transformers' `from_pretrained` and
    `fora.load_model`. The directory is published atomically.
    """
    from safetensors import safe_open

    from fora.formats.safetensors_io import checkpoint_files

    source_dir = Path(source_dir)
    if not (source_dir / "config.json").is_file():
        raise FileNotFoundError(f"{source_dir}/config.json not found; pass the base checkpoint "
                                "folder returned by fora.formats.hub.resolve_checkpoint as source_dir")
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(source_dir):
        with safe_open(file, framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})
    # A 4-bit base: the run trained against the dequantized weights, so those are what is merged.
    for path, w in dequantized_weights(model).items():
        hits = [n for n in state if n == f"{path}.weight" or n.endswith(f".{path}.weight")]
        if len(hits) == 1 and state[hits[0]].shape == w.shape:
            state[hits[0]] = w.cpu().to(state[hits[0]].dtype)
    for path, m in lora_modules(model).items():
        shape = (m.out_features, m.in_features)
        hits = [n for n in state if n == f"{path}.weight" or n.endswith(f".{path}.weight")]
        if len(hits) != 1 or tuple(state[hits[0]].shape) != shape:
            raise ValueError(f"cannot find the base weight of {path} (shape {shape}) in "
                             f"{source_dir} (candidates: {hits[:3]}); pass the checkpoint the model was "
                             "loaded from as source_dir")
        w0 = state[hits[0]]
        state[hits[0]] = m.merged_weight(w0.float()).cpu().to(w0.dtype)  # W0 + s B A (DoRA: m-scaled)
    with staging_dir(out_dir) as tmp:
        atomic_save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in ("config.json", *TOKENIZER_FILES):
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
    return Path(out_dir)
