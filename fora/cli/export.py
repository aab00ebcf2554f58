"""Export a run's adapter, its base model or the merged model as GGUF, for llama.cpp and ollama.

    python scripts/export.py out/run --to gguf-lora            # out/run/adapter-f16.gguf
    python scripts/export.py out/run --to gguf --type f32      # the base it expects: out/run/base-f32.gguf
    python scripts/export.py out/run --to merged --type q8_0   # one model file: out/run/merged-q8_0.gguf
    python scripts/export.py smollm2-135m --to gguf --out smollm2.gguf   # any model argument, no adapter

Then serve the adapter on its base, which needs exporting too (the adapter export prints these lines):
    python scripts/export.py out/run --to gguf --type f16
    llama-cli -m out/run/base-f16.gguf --lora out/run/adapter-f16.gguf
Thin and importable: argparse -> `ExportConfig` -> `main(cfg)` (fora.formats.gguf_export does the work).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fora.training.argparser import ArgumentParser, command_name

TARGETS = ("gguf-lora", "gguf", "merged")
TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class ExportConfig:
    source: str
    to: str = "gguf-lora"
    type: str = "f16"
    out: str | None = None
    base: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag has a help text."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="run folder written by scripts/train.py (for --to gguf also a checkpoint "
                                  "folder, preset name or .gguf file)")
    p.add_argument("--to", default=ExportConfig.to, choices=TARGETS,
                   help="gguf-lora: the adapter for llama.cpp's --lora; gguf: the base model; "
                        "merged: base + adapter merged into one model")
    p.add_argument("--type", default=ExportConfig.type, choices=TYPES,
                   help="tensor type of the 2-D tensors (adapters: f32, f16 or bf16)")
    p.add_argument("--out", help="output file; default inside the run folder (adapter-/base-/merged-TYPE.gguf), "
                                 "or ./NAME-TYPE.gguf for a model argument")
    p.add_argument("--base", help="base model of the adapter (default: adapter_config.json's "
                                  "base_model_name_or_path)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ExportConfig:
    a = build_parser().parse_args(argv)
    return ExportConfig(source=a.source, to=a.to, type=a.type, out=a.out, base=a.base)


def main(cfg: ExportConfig):
    """Run the export; returns `fora.formats.gguf_export.ExportResult`."""
    from fora.formats.gguf_export import export_gguf

    return export_gguf(cfg.source, to=cfg.to, dtype=cfg.type, out=cfg.out, base=cfg.base)


def cli(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = parse_args(argv)
    try:
        result = main(cfg)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as err:
        print(f"{command_name('export.py')}: error: {err}", file=sys.stderr)
        return 1
    from fora.formats.gguf_export import export_summary

    print(export_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
