"""Reading Hugging Face safetensors checkpoints: single file or sharded with an index.

Headers are read first (names, shapes) so that a wrong checkpoint fails before gigabytes are read;
tensors are then read one at a time and cast on the target device.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fora.formats.cache import damaged_fix

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    shape: tuple[int, ...]


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding the weights of `folder`.

    The index wins when all its shards exist. A stale index (a shard missing) next to a complete
    `model.safetensors` falls back to the single file (google/gemma-3-1b-pt once shipped both).
    """
    folder = Path(folder)
    single, index = folder / SINGLE, folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); "
                             f"{damaged_fix(index, 're-download it')}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not missing:
            return [folder / s for s in shards]
        if single.is_file():
            log.warning("%s names missing shards %s; using %s instead", index, missing, single)
            return [single]
        raise FileNotFoundError(f"shard(s) {missing} listed in {index} are missing; re-download the "
                                'checkpoint (e.g. hf download <repo> --include "*.json" --include "*.safetensors" '
                                "--local-dir <folder>)")
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {folder}; fora reads safetensors weights: "
                            "re-download the checkpoint or re-save it with save_pretrained(safe_serialization=True)")


def _corrupt(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is truncated or corrupt ({err}); {damaged_fix(path, 'delete and re-download it')}")


def read_index(files: list[Path]) -> dict[str, TensorEntry]:
    """Tensor name -> (file, shape), from the headers only."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    entries[name] = TensorEntry(path, tuple(f.get_slice(name).get_shape()))
        except SafetensorError as e:
            raise _corrupt(path, e) from e
    return entries


def read_tensors(wanted: dict[str, str], entries: dict[str, TensorEntry], *, dtype: torch.dtype,
                 device: torch.device,
                 convert: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Read `wanted` (our name -> file's name) cast to `dtype` on `device` (round to nearest even).

    `convert(our_name, tensor)`, when given, replaces each tensor right after it is read (e.g. by
    its 4-bit form), so only one full-precision tensor at a time is alive.
    """
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, theirs in wanted.items():
        by_file.setdefault(entries[theirs].file, []).append((ours, theirs))
    out: dict[str, torch.Tensor] = {}
    for n, (path, names) in enumerate(sorted(by_file.items())):
        if len(by_file) > 1:
            log.info("loading shard %d/%d: %s", n + 1, len(by_file), path.name)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for ours, theirs in names:
                    out[ours] = f.get_tensor(theirs).to(device=device, dtype=dtype)
                    if convert is not None:
                        out[ours] = convert(ours, out[ours])
        except SafetensorError as e:
            raise _corrupt(path, e) from e
    return out
