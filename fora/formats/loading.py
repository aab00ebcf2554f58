"""Load a checkpoint folder / preset / hub repo / GGUF file into a `CausalLM`.

The model is built on the `meta` device and the checkpoint tensors are assigned to it
(`load_state_dict(assign=True)`), so the weights never exist twice in memory. Every tensor name
and shape is checked against the model before any data is read.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from fora.formats.cache import cache_entry, damaged_fix
from fora.models.config import ModelConfig
from fora.formats.hub import resolve_checkpoint
from fora.models.decoder import CausalLM
from fora.formats.safetensors_io import checkpoint_files, read_index, read_tensors
from fora.formats.tokenizer import LoadedTokenizer, tokenizer_from_folder
from fora.quant.nf4 import NF4Linear, quantize_nf4
from fora.models.paths import decoder_layers

log = logging.getLogger(__name__)

# Multimodal Gemma-3 stores the text decoder under these prefixes.
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
QUANTIZE = ("nf4",)  # load_model(quantize=...): the linear layers of the blocks in 4-bit NormalFloat
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _our_name(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_config(folder: str | Path) -> ModelConfig:
    """`ModelConfig.from_json`, whose error for a damaged config.json inside fora's cache names the
    cache entry to delete."""
    try:
        return ModelConfig.from_json(folder)
    except ValueError as err:
        path = Path(folder) / "config.json" if Path(folder).is_dir() else Path(folder)
        if isinstance(err.__cause__, json.JSONDecodeError) and cache_entry(path) is not None:
            raise ValueError(f"{path} is not valid JSON ({err.__cause__}); "
                             f"{damaged_fix(path, '')}") from err.__cause__
        raise


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, quantize: str | None = None) -> CausalLM:
    """Load a supported causal LM (eval mode; parameters keep requires_grad=True - callers freeze).

    Args:
        name_or_path: a checkpoint folder (config.json + safetensors), a `.gguf` file, a preset
            short name (see `fora.formats.hub.PRESETS`) or a hub repo id.
        dtype: compute dtype; default bfloat16 on CUDA, float32 on the CPU.
        device: default "cuda" when available, else "cpu".
        quantize: None (full precision) or "nf4": every nn.Linear inside the decoder blocks becomes
            an `NF4Linear` (QLoRA's 4-bit NormalFloat, double-quantized constants), quantized
            tensor by tensor as the shards are read, so the full-precision model never exists;
            embedding, norms and LM head keep `dtype`.
    """
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize={quantize!r}; supported: {', '.join(QUANTIZE)} "
                         "(or None for full-precision weights)")
    folder = resolve_checkpoint(name_or_path)
    config = read_config(folder)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype (e.g. torch.bfloat16), got {dtype}")
    return load_weights(folder, config, dtype=dtype, device=device, quantize=quantize)


def _block_linears(model: CausalLM) -> set[str]:
    """Paths of the nn.Linear modules inside the decoder blocks (the ones QLoRA quantizes)."""
    return {f"model.layers.{i}.{name}" for i, block in enumerate(decoder_layers(model))
            for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def load_weights(folder: Path, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                 quantize: str | None = None) -> CausalLM:
    """Build `CausalLM(config)` on meta and assign the weights of `folder` to it (see `load_model`)."""
    t0 = time.perf_counter()
    entries = read_index(checkpoint_files(folder))
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # shares the embedding; official tied files omit it
    multimodal = config.source is not None and "text_config" in config.source
    wanted: dict[str, str] = {}  # our name -> name in the file
    unexpected: list[str] = []
    for name, entry in entries.items():
        if name.endswith("rotary_emb.inv_freq") or (multimodal and name.startswith(_VISION)):
            continue  # RoPE tables are recomputed; vision weights are not used
        ours = _our_name(name)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            log.warning("%s: ignoring lm_head.weight because the config ties it to the embedding", folder)
            continue
        if ours not in expected:
            unexpected.append(name)
            continue
        if entry.shape != expected[ours]:
            raise ValueError(f"tensor {name} in {entry.file} has shape {list(entry.shape)} but the config "
                             f"expects {list(expected[ours])}: config.json and the weights do not match "
                             "(wrong config.json, or weights of another model size)")
        wanted[ours] = name
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in {folder}: {_show(unexpected)}; the weights do not belong "
                         f"to a {config.architectures[0]} with this config.json (check config.json)")
    missing = sorted(set(expected) - set(wanted))
    if missing:
        raise ValueError(f"missing tensor(s) in {folder}: {_show(missing)}; the checkpoint is incomplete or "
                         "config.json does not match it (e.g. tie_word_embeddings) - "
                         f"{damaged_fix(folder, 're-download it')}")
    n_bytes = sum(torch.Size(expected[k]).numel() for k in wanted) * dtype.itemsize
    log.info("loading %s: %d tensors, %.2f GB as %s on %s", folder, len(wanted), n_bytes / 1e9, dtype, device)
    quantized = {f"{p}.weight" for p in _block_linears(model)} if quantize else set()
    state = read_tensors(wanted, entries, dtype=dtype, device=device,
                         convert=lambda name, t: quantize_nf4(t) if name in quantized else t)
    nf4 = {name[:-len(".weight")]: state.pop(name) for name in quantized}
    model.load_state_dict(state, strict=False, assign=True)
    for path, q in nf4.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, NF4Linear(q, model.get_submodule(path).bias))
    model.tie_weights()  # assign=True replaced the embedding Parameter; re-share it
    log.info("loaded %s in %.1f s", folder, time.perf_counter() - t0)
    return model.eval()


def _show(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_tokenizer(name_or_path: str | Path) -> LoadedTokenizer:
    """The tokenizer of a checkpoint folder, preset, hub repo id or `.gguf` file."""
    path = Path(str(name_or_path)).expanduser()
    return tokenizer_from_folder(path if path.is_dir() else resolve_checkpoint(name_or_path))
