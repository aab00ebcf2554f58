"""Layer selection from per-layer scores (Eq. 3), baselines, and calibration bookkeeping.

Scores come from :func:`fora.fisher.fisher_scores` (higher = more important) or
:func:`fora.baselines.cka.cka_scores` (lower similarity = the layer transforms its input more = more
relevant). This module also holds the calibration-batch validation shared by the scorers, so
every scorer rejects the same malformed input with the same message.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fora.models.loss import IGNORE_INDEX

SELECT_BY = ("fisher", "cka")


def validate_batches(batches: Sequence[Mapping[str, torch.Tensor]], *, labels: bool = True) -> None:
    """Check calibration batches: non-empty, `input_ids` [B, T] (+ `labels`, `attention_mask`) of equal shape.

    With ``labels=True`` every batch must also hold at least one supervised token after the shift
    (``labels[:, 1:] != -100``), since its mean cross-entropy is otherwise undefined.
    """
    if isinstance(batches, Mapping):
        raise ValueError("batches must be a list of batch dicts, got a single dict; wrap it: [batch]")
    if len(batches) == 0:
        raise ValueError("batches is empty: pass at least one calibration batch "
                         "(a dict with input_ids, labels and optionally attention_mask)")
    required = ("input_ids", "labels") if labels else ("input_ids",)
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ValueError(f"batch {i} is a {type(batch).__name__}, expected a dict with keys {required}")
        missing = [k for k in required if k not in batch]
        if missing:
            raise ValueError(f"batch {i} is missing key(s) {missing}; it has {sorted(batch)}. "
                             f"Each batch needs {list(required)} (+ optional 'attention_mask')")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"batch {i}: input_ids must be a 2-D LongTensor [B, T], "
                             f"got {getattr(ids, 'shape', type(ids).__name__)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"batch {i}: input_ids must hold integer token ids, got dtype {ids.dtype}")
        for key in ("labels", "attention_mask"):
            if key in batch and tuple(batch[key].shape) != tuple(ids.shape):
                raise ValueError(f"batch {i}: {key} has shape {tuple(batch[key].shape)} but input_ids has "
                                 f"{tuple(ids.shape)}; {key} must be aligned with input_ids (shifted inside)")
        if labels and not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
            raise ValueError(f"batch {i} has no supervised token (every labels[:, 1:] is {IGNORE_INDEX}); "
                             "drop it or include response tokens in the labels")


def _as_list(scores: torch.Tensor | Sequence[float]) -> list[float]:
    values = scores.detach().cpu().double().flatten().tolist() if isinstance(scores, torch.Tensor) \
        else [float(s) for s in scores]
    bad = [i for i, v in enumerate(values) if math.isnan(v)]
    if bad:
        raise ValueError(f"scores are NaN at layers {bad}; recompute them (check the calibration batches "
                         "and the model dtype) before selecting layers")
    return values


def _check_k(k: int, num_layers: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ValueError(f"k={k!r} is out of range for a model with L={num_layers} layers; "
                         f"choose an integer k in [1, {num_layers}]")


def select_layers(scores: torch.Tensor | Sequence[float], k: int, *, by: str = "fisher") -> list[int]:
    """Indices of the K most relevant layers, sorted ascending.

    Implements Eq. (3): ``S = top-K_l F_l``. With ``by="fisher"`` the K highest scores win; with
    ``by="cka"`` the K *lowest* similarities win (the layers that change the representation most,
    seed 003). Ties break toward the lower layer index.

    Args:
        scores: Tensor[L] or a sequence of L floats.
        k: number of layers to keep, in [1, L].
        by: "fisher" or "cka".
    """
    if by not in SELECT_BY:
        raise ValueError(f"unknown by={by!r}; valid values: {list(SELECT_BY)}")
    values = _as_list(scores)
    _check_k(k, len(values))
    sign = -1.0 if by == "fisher" else 1.0
    order = sorted(range(len(values)), key=lambda i: (sign * values[i], i))
    return sorted(order[:k])


def random_layers(num_layers: int, k: int, seed: int) -> list[int]:
    """K distinct layers drawn uniformly at random (seeded, reproducible), sorted ascending."""
    _check_k(k, num_layers)
    return sorted(random.Random(seed).sample(range(num_layers), k))


def all_layers(num_layers: int) -> list[int]:
    """Every layer index: the LoRA-all baseline."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    return list(range(num_layers))


def calibration_fingerprint(batches: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) over the calibration batches: keys, dtypes, shapes and tensor bytes, in order.

    Saved next to a selection so a run can tell whether it used the same calibration data.
    """
    h = hashlib.sha256()
    h.update(f"batches:{len(batches)}".encode())
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            t = t.detach().cpu().contiguous()
            h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def selection_record(scores: torch.Tensor | Sequence[float], selected: Sequence[int],
                     batches: Sequence[Mapping[str, torch.Tensor]], method: str) -> dict[str, Any]:
    """A JSON-serialisable record of a layer selection, for the training script to save.

    Keys: ``method``, ``scores`` (list of floats, one per layer), ``selected`` (sorted layer indices),
    ``num_layers``, ``k``, ``num_batches``, ``calibration_sha256``.
    """
    values = _as_list(scores)
    chosen = sorted(int(i) for i in selected)
    out_of_range = [i for i in chosen if not 0 <= i < len(values)]
    if out_of_range:
        raise ValueError(f"selected layers {out_of_range} are outside [0, {len(values) - 1}] "
                         f"for {len(values)} scores; pass the indices returned by select_layers")
    return {
        "method": str(method),
        "scores": values,
        "selected": chosen,
        "num_layers": len(values),
        "k": len(chosen),
        "num_batches": len(batches),
        "calibration_sha256": calibration_fingerprint(batches),
    }
