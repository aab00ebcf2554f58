"""From a run folder (or a checkpoint) to the GGUF files llama.cpp and ollama serve.

Three exports (`export_gguf(source, to=...)`):
- "gguf-lora": the run's LoRA adapter as a llama.cpp adapter GGUF (`llama-cli -m BASE.gguf --lora it`);
- "gguf": the base model alone, i.e. the BASE.gguf the adapter expects (`source` is a run folder, whose
  adapter names its base, or any model argument: checkpoint folder, preset, .gguf file);
- "merged": the base with the adapter merged in (`save_merged`: W0 + s B A, DoRA included), one model file.
"""
from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fora.formats.peft_io import ADAPTER_CONFIG

TARGETS = ("gguf-lora", "gguf", "merged")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    kind: str
    dtype: str
    n_tensors: int
    size: int
    base: Path  # the base checkpoint folder
    source: Path | None = None  # the run folder of an adapter export


def adapter_base(run_dir: Path, base: str | None = None) -> Path:
    """The base checkpoint folder of the adapter in `run_dir` (`base` overrides adapter_config.json's)."""
    from fora.formats.hub import PACKAGED_PRESETS, PRESETS, resolve_checkpoint

    if base is None:
        base = json.loads((run_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{run_dir / ADAPTER_CONFIG} names no base_model_name_or_path; pass --base MODEL")
        # a preset's hub id: resolve the preset itself, whose packaged GGUF works offline
        base = next((p for p in PACKAGED_PRESETS if PRESETS[p] == base), base)
    return resolve_checkpoint(base)


def check_writable(out: Path) -> None:
    """A one-line error, before any work, when `out` cannot be written."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; pass a file name such as {out / 'model.gguf'}")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write --out {out}: {parent} is not a writable directory; "
                              "pass --out in a folder you can write to")


def _has_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def _plain_twin(run_dir: Path) -> Path:
    # An AdaLoRA run also writes its exact plain-LoRA form into <run>/lora (peft_io.save_folded_lora):
    # that is the adapter llama.cpp can read.
    kind = json.loads((run_dir / ADAPTER_CONFIG).read_text()).get("peft_type")
    return run_dir / "lora" if kind == "ADALORA" and _has_adapter(run_dir / "lora") else run_dir


def default_out(source: str, to: str, dtype: str) -> Path:
    """`<run>/adapter-<type>.gguf`, `<run>/merged-<type>.gguf`, `<run>/base-<type>.gguf` for a run
    folder; `./<name>-<type>.gguf` for a model argument."""
    path = Path(source).expanduser()
    if _has_adapter(path):
        return path / f"{ {'gguf-lora': 'adapter', 'merged': 'merged', 'gguf': 'base'}[to] }-{dtype}.gguf"
    return Path(f"{path.stem if path.suffix == '.gguf' else path.name}-{dtype}.gguf")


def export_gguf(source: str | os.PathLike, *, to: str, dtype: str = "f16", out: str | os.PathLike | None = None,
                base: str | None = None) -> ExportResult:
    """Export `source` (a run folder with an adapter, or for "gguf" also a model argument) as GGUF."""
    import torch

    from fora.formats.gguf_model import export_model_gguf
    from fora.formats.gguf_reader import read_gguf
    from fora.formats.gguf_writer import ADAPTER_TYPES, GGML_TYPES, export_adapter_gguf
    from fora.formats.hub import resolve_checkpoint

    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not an export; use one of {', '.join(TARGETS)}")
    kinds = ADAPTER_TYPES if to == "gguf-lora" else tuple(GGML_TYPES)
    if dtype not in kinds:
        raise ValueError(f"--type {dtype!r} is not supported for --to {to}; use one of {', '.join(kinds)}")
    src = Path(source).expanduser()
    if to != "gguf" and not _has_adapter(src):
        raise FileNotFoundError(f"{src} holds no adapter ({ADAPTER_CONFIG} not found); pass the run folder "
                                "scripts/train.py wrote, or --to gguf to export a base model")
    out = Path(out) if out is not None else default_out(str(source), to, dtype)
    adapter = _plain_twin(src) if _has_adapter(src) else src
    check_writable(out)
    if to == "gguf" and not _has_adapter(src):
        folder = resolve_checkpoint(str(source) if base is None else base)
    else:
        folder = adapter_base(src, base)
    if to == "gguf-lora":
        export_adapter_gguf(adapter, json.loads((folder / "config.json").read_text()), out, dtype=dtype,
                            name=src.name)
    elif to == "gguf":
        export_model_gguf(folder, out, dtype=dtype, name=folder.name)
    else:
        from fora.formats.loading import load_model
        from fora.formats.peft_io import load_adapter, save_merged

        model = load_adapter(load_model(folder, dtype=torch.float32, device="cpu"), adapter)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            merged = save_merged(model, Path(tmp) / "merged", source_dir=folder)
            export_model_gguf(merged, out, dtype=dtype, name=f"{src.name}-merged")
    return ExportResult(out, to, dtype, len(read_gguf(out).tensors), out.stat().st_size, folder,
                        src if _has_adapter(src) else None)


def how_to_run(result: ExportResult) -> str:
    """The command line that serves the written file; for an adapter, preceded by the export that
    writes the base GGUF it needs when that file is not there yet."""
    if result.kind != "gguf-lora":
        return f"llama-cli -m {shlex.quote(str(result.path))}"
    name = result.path.name
    base = result.path.with_name(name.replace("adapter-", "base-", 1) if name.startswith("adapter-")
                                 else f"base-{result.dtype}.gguf")
    serve = f"llama-cli -m {shlex.quote(str(base))} --lora {shlex.quote(str(result.path))}"
    if base.is_file() or result.source is None:
        return serve
    run = result.source
    out = "" if base == default_out(str(run), "gguf", result.dtype) else f" --out {shlex.quote(str(base))}"
    return (f"python scripts/export.py {shlex.quote(str(run))} --to gguf --type {result.dtype}{out} && {serve}"
            "   (the first command writes the base model the adapter needs)")


def export_summary(result: ExportResult) -> str:
    """What export.py and train.py --export print: the file, its size and tensor count, how to run it."""
    return (f"wrote {result.path} ({result.size / 1e6:.1f} MB, {result.n_tensors} tensors, {result.dtype})\n"
            f"run it: {how_to_run(result)}")
