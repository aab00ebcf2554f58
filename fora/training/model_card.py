"""What an adapter says about its base model: `base_model_name_or_path` and the model card.

`adapter_config.json` names the base by its hub id whenever one is known (a preset, a hub
download), never by a path into a cache: a cache path means nothing on another machine. A base
converted from a quantized GGUF file is not the hub's original weights, so the adapter's
`README.md` (the model card peft and the hub read) says which file the weights came from.
"""
from __future__ import annotations

from pathlib import Path

from fora.formats.hub import PRESETS

README_FILE = "README.md"


def base_model_id(model: str, folder: Path) -> str:
    """The base model as `adapter_config.json` should name it.

    Args:
        model: the `--model` argument (preset, hub id, folder or .gguf file).
        folder: the checkpoint folder it resolved to (`fora.formats.hub.resolve_checkpoint`).
    Returns:
        the hub id for a preset (hub snapshot or packaged GGUF alike) or a hub download; else the
        absolute path the user gave (their folder or .gguf file), never the converted cache folder.
    """
    if model in PRESETS:
        return PRESETS[model]
    if Path(folder).parent.name == "snapshots":  # huggingface_hub's cache layout: `model` is a repo id
        return model
    return str(Path(model).expanduser().resolve())


def gguf_source(folder: Path) -> str | None:
    """The GGUF file name a converted folder was dequantized from (`convert_gguf` records it in the
    safetensors metadata), or None for an ordinary checkpoint."""
    from safetensors import safe_open

    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        source = (f.metadata() or {}).get("source", "")
    return source if source.lower().endswith(".gguf") else None


def model_card(base: str, *, method: str, layers: list[int], gguf: str | None,
               evaluation: str | None = None) -> str:
    """The adapter's README.md: hub front matter (`base_model`, `library_name: peft`), a note
    on where the base weights came from, and the end-of-run evaluation table if there is one."""
    lines = ["---", f"base_model: {base}", "library_name: peft", "tags:", "- fora", "- lora"]
    if gguf is not None:
        lines.append(f"base_model_weights: dequantized from the quantized GGUF file {gguf}")
    lines += ["---", "", f"# LoRA adapter trained with fora (method `{method}`)", "",
              f"Base model: `{base}`. Adapted decoder layers: {layers}. A plain PEFT LoRA adapter: "
              "load it with `peft.PeftModel.from_pretrained(base_model, this_folder)`.", ""]
    if gguf is not None:
        lines += [f"The base weights during training were dequantized from the quantized GGUF file "
                  f"`{gguf}`, not the original `{base}` weights; on the original weights the "
                  "adapter sees slightly different activations.", ""]
    if evaluation is not None:
        lines += ["## Held-out accuracy", "", "Measured at the end of training (`eval.json`): before = the "
                  "base model (adapters off), after = with this adapter.", "", evaluation, ""]
    return "\n".join(lines)
